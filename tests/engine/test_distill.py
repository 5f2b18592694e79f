"""DynaSegFormer's two-stage distillation: loss values on hand-made tensors, the recipe loader, and a tiny run on
procedural scenes through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from edgeseg import create_model, save_checkpoint
from edgeseg.cli import main
from edgeseg.config import DistillCfg, load_config
from edgeseg.engine.distill import feature_mse, soft_cross_entropy, stage1_loss, stage2_loss
from edgeseg.engine.train import seg_loss, train
from edgeseg.models.dynamic import dynamic_gates, from_segformer, gate_l1, set_sparsity

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# ------------------------------------------------------------------------------------------------------ losses
def test_feature_mse_by_hand():
    a = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.ones(1, 3)]
    b = [torch.zeros(2, 2), torch.tensor([[1.0, 1.0, 4.0]])]
    assert feature_mse(a, b).item() == pytest.approx((1 + 4 + 9 + 16) / 4 + 9 / 3)
    assert feature_mse(a, a).item() == 0.0
    with pytest.raises(ValueError, match="features"):
        feature_mse(a, b[:1])


def test_soft_cross_entropy_by_hand():
    teacher = torch.zeros(1, 2, 1, 1)  # q = (1/2, 1/2)
    student = torch.tensor([0.0, math.log(3.0)]).reshape(1, 2, 1, 1)  # p = (1/4, 3/4)
    expect = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_cross_entropy(student, teacher).item() == pytest.approx(expect)
    # τ = 2 divides both logits by 2 and multiplies the loss by τ² = 4
    assert soft_cross_entropy(student * 2, teacher, temperature=2.0).item() == pytest.approx(4 * expect)
    # mean over pixels: a second pixel where the student matches the teacher adds its entropy log 2
    two = soft_cross_entropy(torch.cat([student, teacher], 3), torch.cat([teacher, teacher], 3))
    assert two.item() == pytest.approx((expect + math.log(2.0)) / 2)
    # minimised (zero gradient) when the student predicts the teacher's distribution
    s = torch.randn(2, 5, 3, 3)
    t = s.clone().requires_grad_(True)
    soft_cross_entropy(t, s.detach()).backward()
    assert t.grad.abs().max() < 1e-7
    with pytest.raises(ValueError, match="differ"):
        soft_cross_entropy(student, torch.zeros(1, 3, 1, 1))


def test_stage_losses_combine_their_terms():
    torch.manual_seed(0)
    teacher = create_model("segformer-b0", num_classes=4, depths=[1, 1, 1, 1]).eval()
    # no dropout / drop path: two train-mode forwards of the same batch are then identical
    student = from_segformer(teacher, sparsity=0.0, drop_path_rate=0.0, dropout=0.0).train()
    dcfg = DistillCfg(lambda_gate=0.01, lambda_soft=0.5, temperature=2.0)
    img = torch.randn(2, 3, 32, 32)
    gt = torch.randint(0, 4, (2, 32, 32))
    gt[0, :4] = 255
    # at sparsity 0 the student is the teacher: stage 1 is the L1 term alone, on gates that are all 1
    out = stage1_loss(student, teacher, img, dcfg)
    n_gates = sum(g.gated_features for g in dynamic_gates(student))
    assert out["mse"].item() < 1e-10 and out["l1"].item() == pytest.approx(n_gates)
    assert out["loss"].item() == pytest.approx(out["mse"].item() + 0.01 * n_gates)

    set_sparsity(student, 0.5)
    out = stage2_loss(student, teacher, img, gt, dcfg)
    with torch.no_grad():
        logits, t_logits = student(img), teacher(img)
        ce, soft, l1 = seg_loss(logits, gt), soft_cross_entropy(logits, t_logits, 2.0), gate_l1(student)
    assert out["ce"].item() == pytest.approx(ce.item()) and out["soft"].item() == pytest.approx(soft.item())
    assert out["l1"].item() == pytest.approx(l1.item())
    assert l1.item() == pytest.approx(n_gates)  # the L1 is on G (all 1 while the gates are fresh), not on M
    assert out["loss"].item() == pytest.approx(ce.item() + 0.5 * soft.item() + 0.01 * l1.item())
    assert soft.item() > 0 and ce.item() > 0


# ------------------------------------------------------------------------------------------------------ config
def test_shipped_recipes_load_and_overrides_reach_both_parts(tmp_path):
    names = sorted(p.name for p in CONFIGS.glob("dynasegformer_*.yaml"))
    assert {"dynasegformer_b0_ade20k_30.yaml", "dynasegformer_b0_ade20k_50.yaml", "dynasegformer_b2_ade20k_30.yaml",
            "dynasegformer_b2_ade20k_50.yaml"} <= set(names) and any("cityscapes" in n for n in names)
    topformer = sorted(p.name for p in CONFIGS.glob("topformer_*_dynamic_*.yaml"))
    assert {"topformer_tiny_dynamic_ade20k_30.yaml", "topformer_tiny_dynamic_scenes_30.yaml"} <= set(topformer)
    for name in names + topformer:
        cfg = load_config(CONFIGS / name)
        dcfg = cfg.distill
        dynamic = cfg.model.name.startswith("dynasegformer-") or cfg.model.overrides.get("dynamic") is True
        assert dynamic and dcfg.sparsity == float(name[-7:-5]) / 100
        assert 0 < dcfg.anneal_iters <= dcfg.stage1_iters + cfg.schedule.iters
    cfg = load_config(CONFIGS / "dynasegformer_b0_ade20k_30.yaml",
                      ["distill.temperature=2", "optim.lr=1e-4", "distill.teacher=t.pth", "distill.stage1_iters=1_000"])
    assert cfg.distill.temperature == 2.0 and cfg.distill.teacher == "t.pth" and cfg.optim.lr == 1e-4
    assert cfg.distill.stage1_iters == 1000 and isinstance(cfg.distill.stage1_iters, int)
    cfg.dump(tmp_path / "dump.yaml")  # the section survives a round trip (work_dir/config.yaml of a run)
    assert load_config(tmp_path / "dump.yaml") == cfg


def test_distill_section_is_optional(tmp_path):
    plain = load_config(None)
    assert plain.distill is None and "distill" not in plain.to_dict()  # train runs' config.yaml unchanged
    path = tmp_path / "empty.yaml"
    path.write_text("model:\n  name: dynasegformer-b0\ndistill:\n  sparsity: 0.5\n")
    assert load_config(path).distill == DistillCfg(sparsity=0.5)  # unset keys take the defaults
    with pytest.raises(ValueError, match="no 'distill:' section"):
        load_config(None, ["distill.sparsity=0.5"])
    with pytest.raises(ValueError, match="has a distill: section.*edgeseg distill"):
        train(load_config(path), tmp_path / "run", progress=False)


def test_recipe_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "dynasegformer-b0"}, "distill": {"sparsty": 0.3}}))
    with pytest.raises(ValueError, match="did you mean 'distill.sparsity'"):
        load_config(path)
    path.write_text(yaml.safe_dump({"distill": {"sparsity": 1.5}}))
    with pytest.raises(ValueError, match="distill.sparsity must be in"):
        load_config(path)
    with pytest.raises(ValueError, match="unknown config key 'distill.lamda_soft'.*did you mean 'distill.lambda_soft'"):
        load_config(CONFIGS / "dynasegformer_b0_ade20k_30.yaml", ["distill.lamda_soft=1"])
    with pytest.raises(ValueError, match="distill.temperature: expected float"):
        load_config(CONFIGS / "dynasegformer_b0_ade20k_30.yaml", ["distill.temperature=warm"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------------ end to end
def test_tiny_distill_run_on_scenes(tmp_path, capsys, tiny_distill_recipe):
    torch.manual_seed(0)
    teacher = create_model("segformer-b0", num_classes=8, depths=[1, 1, 1, 1])
    save_checkpoint(tmp_path / "teacher.pth", teacher)
    path = tiny_distill_recipe({"name": "dynasegformer-b0", "overrides": {"drop_path_rate": 0.0}})
    work = tmp_path / "run"
    code = main(["distill", str(path), "--teacher", str(tmp_path / "teacher.pth"), "--work-dir", str(work),
                 "--no-progress", "--set", "distill.lambda_gate=1e-3"])
    assert code == 0 and "final.pth" in capsys.readouterr().out
    rows = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["mode"] == "train"]
    assert [(r["stage"], r["iter"], r["sparsity"]) for r in train_rows] == [(1, 1, 0.0), (1, 2, 0.25),
                                                                              (2, 3, 0.5), (2, 4, 0.5)]
    assert all({"mse", "l1"} <= r.keys() for r in train_rows[:2]) and all(
        {"ce", "soft", "l1"} <= r.keys() for r in train_rows[2:])
    assert train_rows[0]["mse"] < 1e-10 < train_rows[1]["mse"]  # pruning starts at the second step
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    val = [r for r in rows if r["mode"] == "val"]
    assert len(val) == 1 and val[0]["iter"] == 4 and val[0]["mIoU"] is not None
    for name in ("config.yaml", "stage1.pth", "final.pth", "best.pth"):
        assert (work / name).is_file(), name
    saved = yaml.safe_load((work / "config.yaml").read_text())
    assert saved["distill"]["lambda_gate"] == 1e-3 and saved["distill"]["teacher"] == str(tmp_path / "teacher.pth")
    ckpt = torch.load(work / "final.pth", map_location="cpu", weights_only=True)
    assert ckpt["model_name"] == "dynasegformer-b0" and ckpt["model_args"]["sparsity"] == 0.5
    student = create_model(ckpt["model_name"], **ckpt["model_args"])
    student.load_state_dict(ckpt["state_dict"])  # strict: the student is a complete DynaSegFormer
    changed = [k for k, v in teacher.encoder.state_dict().items()
               if not torch.equal(v, ckpt["state_dict"]["encoder." + k])]
    assert changed  # the encoder was trained

    # a teacher of another size is refused with the fix in the message
    save_checkpoint(tmp_path / "b1.pth", create_model("segformer-b1", num_classes=8, depths=[1, 1, 1, 1]))
    code = main(["distill", str(path), "--teacher", str(tmp_path / "b1.pth"), "--work-dir", str(tmp_path / "x"),
                 "--no-progress"])
    assert code == 2 and "segformer-b1" in capsys.readouterr().err

    # a recipe without a distill: section is refused, naming the file
    plain = tmp_path / "plain.yaml"
    recipe = yaml.safe_load(path.read_text())
    plain.write_text(yaml.safe_dump({k: v for k, v in recipe.items() if k != "distill"}))
    code = main(["distill", str(plain), "--teacher", str(tmp_path / "teacher.pth"), "--work-dir", str(tmp_path / "y"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"'{plain}' has no distill: section" in err and not (tmp_path / "y").exists()
