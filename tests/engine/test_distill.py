"""DynaSegFormer's two-stage distillation: loss values on hand-made tensors, the recipe loader, a tiny run on
procedural scenes through the CLI, exact resumption in either stage, and DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from edgeseg import create_model, save_checkpoint
from edgeseg.cli import main
from edgeseg.config import DistillCfg, load_config
from edgeseg.data.classes import SCENES_CLASSES
from edgeseg.engine.distill import (
    StudentFeatures,
    distill,
    feature_mse,
    soft_cross_entropy,
    stage1_loss,
    stage2_loss,
)
from edgeseg.engine.train import seg_loss, train
from edgeseg.models.dynamic import dynamic_gates, gate_l1, set_sparsity
from edgeseg.models.dynasegformer import from_segformer

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
    out = stage1_loss(StudentFeatures(student), teacher, img, dcfg)
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
    with pytest.raises(ValueError, match=r"distill.anneal_iters \(50\) exceeds the run's stage1_iters"):
        load_config(CONFIGS / "dynasegformer_b0_ade20k_30.yaml",
                    ["distill.anneal_iters=50", "distill.stage1_iters=1", "schedule.iters=1"])
    with pytest.raises(ValueError, match="lambda_gate and lambda_soft weigh losses"):
        load_config(CONFIGS / "dynasegformer_b0_ade20k_30.yaml", ["distill.lambda_gate=-1"])
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
    out = capsys.readouterr().out
    assert code == 0 and "final.pth" in out and "data: 8 training images, 2 validation images" in out
    rows = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["mode"] == "train"]
    assert [(r["stage"], r["iter"], r["sparsity"]) for r in train_rows] == [(1, 1, 0.0), (1, 2, 0.25),
                                                                              (2, 3, 0.5), (2, 4, 0.5)]
    # each stage its own poly schedule over its own 2 steps (no warm-up): 1e-3, then 1e-3·(1 − 1/2)
    assert [r["lr"] for r in train_rows] == pytest.approx([1e-3, 5e-4, 1e-3, 5e-4], rel=1e-9)
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
    assert ckpt["class_names"] == list(SCENES_CLASSES)  # the training set's labels, for predict and HF export
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
    # a teacher, or a recipe, of another class count than the dataset's: refused at start, naming the dataset
    save_checkpoint(tmp_path / "five.pth", create_model("segformer-b0", num_classes=5, depths=[1, 1, 1, 1]))
    code = main(["distill", str(path), "--teacher", str(tmp_path / "five.pth"), "--work-dir", str(tmp_path / "x"),
                 "--no-progress"])
    assert code == 2 and (f"teacher '{tmp_path / 'five.pth'}' predicts 5 classes but dataset scenes lists 8 classes: "
                          f"distil from a teacher trained on this dataset") in capsys.readouterr().err
    code = main(["distill", str(path), "--teacher", str(tmp_path / "teacher.pth"), "--work-dir", str(tmp_path / "x"),
                 "--no-progress", "--set", "model.num_classes=5"])
    assert code == 2 and "model.num_classes is 5 but dataset scenes lists 8 classes" in capsys.readouterr().err
    # so is a dynamic model given as the teacher (the student itself)
    code = main(["distill", str(path), "--teacher", str(work / "final.pth"), "--work-dir", str(tmp_path / "x"),
                 "--no-progress"])
    assert code == 2 and "is a dynamic model (dynasegformer-b0)" in capsys.readouterr().err

    # a recipe without a distill: section is refused, naming the file
    plain = tmp_path / "plain.yaml"
    recipe = yaml.safe_load(path.read_text())
    plain.write_text(yaml.safe_dump({k: v for k, v in recipe.items() if k != "distill"}))
    code = main(["distill", str(plain), "--teacher", str(tmp_path / "teacher.pth"), "--work-dir", str(tmp_path / "y"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"'{plain}' has no distill: section" in err and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------ resumption and DDP
def _teacher(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "teacher.pth", create_model("segformer-b0", num_classes=8, depths=[1, 1, 1, 1]))


def _rows(work_dir: Path) -> list[dict]:
    """log.jsonl without the wall-clock column."""
    rows = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_distill_resumes_exactly_in_either_stage(tmp_path, tiny_distill_recipe):
    # default drop path and dropout: a resumed run only matches if every generator is restored
    recipe = tiny_distill_recipe({"name": "dynasegformer-b0"})
    teacher = _teacher(tmp_path)
    cfg = load_config(recipe, [f"distill.teacher={teacher}", "train.checkpoint_interval=1"])
    first = tmp_path / "uninterrupted"
    distill(cfg, first, progress=False, log=lambda *a: None)
    stages = [torch.load(first / f"iter_{k}.pth", weights_only=True)["stage"] for k in (1, 2, 3, 4)]
    assert stages == [1, 1, 2, 2]
    latest, final = _weights(first / "latest.pth"), _weights(first / "final.pth")
    assert all(torch.equal(latest[name], final[name]) for name in final)  # latest.pth is the last step's
    reference = _rows(first)

    # "crash" after step k: a fresh work dir holding only iter_k.pth as latest.pth. k = 1 is inside stage 1, k = 2
    # its very end (stage 2 must start with a fresh AdamW), k = 3 inside stage 2 (its AdamW state must be loaded).
    for k in (1, 2, 3):
        work = tmp_path / f"resumed_at_{k}"
        work.mkdir()
        shutil.copy(first / f"iter_{k}.pth", work / "latest.pth")
        if k == 2:
            code = main(["distill", str(recipe), "--teacher", str(teacher), "--work-dir", str(work), "--no-progress",
                         "--set", "train.checkpoint_interval=1", "--resume", "auto"])
            assert code == 0
        else:
            distill(cfg, work, resume="auto", progress=False, log=lambda *a: None)
        rows = _rows(work)
        assert rows == [r for r in reference if r["iter"] > k], k  # losses, lr, sparsity, mIoU: bit for bit
        after = _weights(work / "final.pth")
        assert all(torch.equal(after[name], final[name]) for name in final), k
    assert (tmp_path / "resumed_at_1" / "stage1.pth").is_file()
    # back to step 3 in the finished run's own folder: its log keeps steps 1..3 and writes step 4 once
    distill(cfg, first, resume=str(first / "iter_3.pth"), progress=False, log=lambda *a: None)
    assert _rows(first) == reference

    # the stages of another recipe do not hold step 3 in stage 2
    with pytest.raises(ValueError, match="iter_3.pth: written at step 3 of stage 2.*distill.stage1_iters"):
        distill(load_config(recipe, [f"distill.teacher={teacher}", "distill.stage1_iters=3"]), tmp_path / "other",
                resume=str(first / "iter_3.pth"), progress=False, log=lambda *a: None)


def test_annealing_over_the_whole_run_evaluates_at_the_current_sparsity_and_keeps_best_for_the_target(
        tmp_path, tiny_distill_recipe, monkeypatch):
    import edgeseg.engine.distill as distill_module

    # T = every step of both stages (the second summary's "total number of training steps"): stage 2 still anneals
    recipe = tiny_distill_recipe({"name": "dynasegformer-b0", "overrides": {"drop_path_rate": 0.0}})
    cfg = load_config(recipe, [f"distill.teacher={_teacher(tmp_path)}", "distill.anneal_iters=4",
                               "train.eval_interval=1"])
    scores = iter([50.0, 40.0])  # mid-annealing, the less pruned student scores higher, as it would
    gates_when_scored = []

    def evaluate(model, *args):
        gates_when_scored.append({gate.sparsity for gate in dynamic_gates(model)})
        return {"mIoU": next(scores), "mAcc": 0.0, "aAcc": 0.0}

    monkeypatch.setattr(distill_module, "evaluate_during_training", evaluate)
    out = distill(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    val = [(r["iter"], r["sparsity"], r["mIoU"]) for r in _rows(tmp_path / "run") if r["mode"] == "val"]
    assert val == [(3, 0.375, 50.0), (4, 0.5, 40.0)]  # the student after each step, at that step's s_t
    assert gates_when_scored == [{0.375}, {0.5}]
    assert out["last_eval"]["sparsity"] == 0.5  # the result says at which sparsity it was scored
    best = torch.load(tmp_path / "run" / "best.pth", weights_only=True)
    assert best["iteration"] == 4 and best["mIoU"] == out["best_mIoU"] == 40.0  # 50 at s = 0.375 did not compete


def test_distill_resume_errors_name_the_file_and_the_fix(tmp_path, capsys, tiny_distill_recipe):
    recipe = tiny_distill_recipe({"name": "dynasegformer-b0"})
    teacher = _teacher(tmp_path)
    plain = tmp_path / "plain.yaml"  # the same data for edgeseg train
    plain.write_text(yaml.safe_dump({**{k: v for k, v in yaml.safe_load(recipe.read_text()).items() if k != "distill"},
                                     "model": {"name": "segformer-b0", "overrides": {"depths": [1, 1, 1, 1]}}}))
    train(load_config(plain, ["schedule.iters=1", "train.eval_interval=0"]), tmp_path / "trained", progress=False,
          log=lambda *a: None)

    def resume_error(path: Path) -> str:
        code = main(["distill", str(recipe), "--teacher", str(teacher), "--work-dir", str(tmp_path / "run"),
                     "--no-progress", "--resume", str(path)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        return err

    assert (f"--resume {teacher}: holds no training state (optimizer, iteration); resume from latest.pth or an "
            f"iter_N.pth of the distillation run") in resume_error(teacher)
    trained = tmp_path / "trained" / "latest.pth"
    assert (f"--resume {trained}: a checkpoint of edgeseg train, not of a distillation; resume from latest.pth or an "
            f"iter_N.pth written by edgeseg distill") in resume_error(trained)
    missing = tmp_path / "missing.pth"
    assert f"--resume {missing}: no such checkpoint; pass a .pth written by edgeseg distill or 'auto'" in \
        resume_error(missing)
    assert not (tmp_path / "run").exists()  # refused before the work folder is made


def test_distill_resume_refuses_another_sparsity_or_teacher(tmp_path, capsys, tiny_distill_recipe):
    recipe = tiny_distill_recipe({"name": "dynasegformer-b0", "overrides": {"drop_path_rate": 0.0}})
    teacher = _teacher(tmp_path)
    work = tmp_path / "run"
    distill(load_config(recipe, [f"distill.teacher={teacher}"]), work, progress=False, log=lambda *a: None)

    def resume(*extra: str, teacher: Path = teacher, path: Path = work / "iter_2.pth") -> tuple[int, str]:
        code = main(["distill", str(recipe), "--teacher", str(teacher), "--work-dir", str(work), "--no-progress",
                     "--resume", str(path), *extra])
        return code, capsys.readouterr().err

    code, err = resume("--set", "distill.sparsity=0.6")  # the gates were pruned toward 0.5
    assert code == 2 and err.count("\n") == 1 and (
        f"--resume {work / 'iter_2.pth'}: written for dynasegformer-b0 {{'num_classes': 8, 'sparsity': 0.5, "
        f"'depths': [1, 1, 1, 1], 'drop_path_rate': 0.0}}, but the recipe builds dynasegformer-b0 {{'num_classes': 8, "
        f"'sparsity': 0.6, ") in err
    torch.manual_seed(1)
    other = save_checkpoint(tmp_path / "other.pth", create_model("segformer-b0", num_classes=8, depths=[1, 1, 1, 1]))
    code, err = resume(teacher=other)
    assert code == 2 and err.count("\n") == 1 and (
        f"--resume {work / 'iter_2.pth'}: written with the teacher {teacher} (weights sha256 ") in err and (
        f"--teacher {other} holds other weights (") in err and "resume with the teacher that run started with" in err
    assert torch.load(work / "final.pth", weights_only=True)["model_args"]["sparsity"] == 0.5  # not relabelled

    # the same weights under another name resume; so does a checkpoint older than the teacher's record
    moved = shutil.copy(teacher, tmp_path / "renamed.pth")
    assert resume(teacher=Path(moved), path=work / "latest.pth") == (0, "")
    # a regularisation knob builds the same model: a resume may change it, as mmseg's does
    assert resume("--set", "model.overrides.drop_path_rate=0.1", path=work / "latest.pth") == (0, "")
    old = torch.load(work / "latest.pth", weights_only=True)
    del old["teacher_sha256"]
    torch.save(old, work / "old.pth")
    assert resume(teacher=other, path=work / "old.pth") == (0, "")


def test_a_diverging_distillation_stops_with_the_fix(tmp_path, tiny_distill_recipe):
    recipe = tiny_distill_recipe({"name": "dynasegformer-b0"})
    cfg = load_config(recipe, [f"distill.teacher={_teacher(tmp_path)}", "optim.lr=1e6", "train.eval_interval=0"])
    with pytest.raises(ValueError, match=r"^the training loss is not finite from iteration 2: the run diverged; "
                                         r"lower optim.lr"):
        distill(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    assert [r["iter"] for r in _rows(tmp_path / "run")] == [1]  # no NaN row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_distill_worker(rank: int, world: int, port: int, recipe: str, teacher: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = load_config(recipe, [f"distill.teacher={teacher}"])
    result = distill(cfg, Path(out_dir) / "ddp", progress=False, log=lambda *a: None)
    torch.save(result["model"].state_dict(), Path(out_dir) / f"rank{rank}.pt")


def test_ddp_distill_two_processes_stay_identical(tmp_path, tiny_distill_recipe):
    # 4 images per step = 2 processes x 2 micro-steps of 1 image: the first micro-step runs under no_sync
    recipe = tiny_distill_recipe({"name": "dynasegformer-b0"})
    settings = yaml.safe_load(recipe.read_text())
    settings["data"]["batch_size"], settings["train"]["grad_accum"] = 4, 2
    settings["train"]["checkpoint_interval"], settings["distill"]["lambda_gate"] = 1, 1e-3
    recipe.write_text(yaml.safe_dump(settings))
    teacher = _teacher(tmp_path)
    # spawn, not fork (see test_train); a hang fails the test after two minutes
    context = mp.start_processes(_ddp_distill_worker, nprocs=2, join=False, start_method="spawn",
                                 args=(2, _free_port(), str(recipe), str(teacher), str(tmp_path)))
    deadline = time.monotonic() + 120
    for process in context.processes:
        process.join(max(0.0, deadline - time.monotonic()))
    if any(process.is_alive() for process in context.processes):
        for process in context.processes:
            process.kill()
        pytest.fail("DDP distillation workers did not finish within 120 s")
    context.join()  # re-raises a worker's exception

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    params = [k for k in r0 if "running" not in k and "num_batches" not in k]
    assert params and all(torch.equal(r0[k], r1[k]) for k in params)
    assert any(not torch.equal(r0[k], r1[k]) for k in r0 if "running_mean" in k)  # each rank had its own images
    work = tmp_path / "ddp"
    rows = _rows(work)
    assert [(r["mode"], r["stage"], r["iter"]) for r in rows] == [("train", 1, 1), ("train", 1, 2), ("train", 2, 3),
                                                                  ("train", 2, 4), ("val", 2, 4)]
    ckpt = torch.load(work / "latest.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["stage"] == 2

    # At step 1 the student is the teacher (sparsity 0): the feature MSE is ~0 and the gate L1 term alone moves the
    # gates. λ_m > 0 on G = fc2.bias ≡ 1 pushes every bias down by ~lr in AdamW's first step, through DDP's hooks.
    step1 = _weights(work / "iter_1.pth")
    biases = [v for k, v in step1.items() if k.endswith("predictor.fc2.bias")]
    lr = settings["optim"]["lr"]
    assert biases and all((b < 1 - lr / 2).all() for b in biases)
