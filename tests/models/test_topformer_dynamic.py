"""TopFormer with a dynamic semantics extractor (DGL beyond the DynaSegFormer paper): builder, student from a
dense teacher, masked == gathered == fused, top-r counts, executed MACs, checkpoints, distillation end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from edgeseg import create_model, load_model, save_checkpoint
from edgeseg.checkpoint import detect_layout
from edgeseg.cli import main
from edgeseg.deploy.benchmark import count_gmacs
from edgeseg.models import dynamic
from edgeseg.models.dynamic import keep_count, set_gather, set_sparsity
from edgeseg.models.topformer import DynamicAttention, DynamicMLP, from_topformer, infer_model


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random gate last layers (fresh gates output G ≡ 1, a tie) and BN statistics (fresh ones are the identity),
    so per-image masks differ and the BN folding of the gathered form is exercised."""
    dynamic.random_gates_(model, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
    return model


def test_builder_option_and_validation():
    model = create_model("topformer-tiny", num_classes=5, dynamic=True, sparsity=0.5)
    blocks = model.extractor.blocks
    assert all(isinstance(b.attn, DynamicAttention) and isinstance(b.mlp, DynamicMLP) for b in blocks)
    assert model.model_args == {"num_classes": 5, "dynamic": True, "sparsity": 0.5}
    # a sparsity implies the dynamic extractor; the dense model has no gates
    implied = create_model("topformer-small", sparsity=0.3)
    assert implied.model_args["dynamic"] is True and len(list(dynamic.dynamic_gates(implied))) == 3 * 4
    assert not list(dynamic.dynamic_gates(create_model("topformer-tiny")))
    with pytest.raises(ValueError, match="dynamic=False"):
        create_model("topformer-tiny", dynamic=False, sparsity=0.3)
    with pytest.raises(ValueError, match="TopFormer segmentation model"):
        from_topformer(create_model("topformer-tiny-cls"))
    with pytest.raises(ValueError, match="TopFormer segmentation model"):
        from_topformer(create_model("segformer-b0"))


def test_student_starts_as_the_teacher():
    torch.manual_seed(0)
    teacher = randomise(create_model("topformer-tiny", num_classes=7)).eval()
    student = from_topformer(teacher, sparsity=0.0).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        set_gather(student, False)
        assert torch.equal(student(x), teacher(x))  # G ≡ 1: the masks multiply by exactly 1
        set_gather(student, True)
        assert (student(x) - teacher(x)).abs().max() <= 1e-5 * teacher(x).abs().max()


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_masked_equals_gathered_and_fused_float64(sparsity):
    """The three forms compute the same logits; in float64 the difference is rounding only (the unscaled
    attention of this family amplifies float32 rounding of random weights to ~1e-5 of the logits)."""
    torch.manual_seed(0)
    teacher = randomise(create_model("topformer-tiny", num_classes=7)).eval().double()
    student = randomise(from_topformer(teacher, sparsity), seed=1).eval()
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        set_gather(student, False)
        masked = student(x)
        set_gather(student, True)
        gathered = student(x)
        fused = student.fuse()(x)
        unpadded = student.fuse(pad_multiple=1)(x)
        alone = student(x[1:])
    for out in (gathered, fused, unpadded):
        assert (out - masked).abs().max() <= 1e-10
    assert (alone - gathered[1:]).abs().max() <= 1e-10  # each image keeps its own channels, batch or not
    assert (masked - teacher(x)).abs().max() > 1e-2  # pruning is real


def test_top_r_counts_and_padded_widths():
    """Tiny: 4 heads of 16 Q/K and 32 V channels, a 416-wide MLP hidden layer; per image and head the gates keep
    round((1 − s)·n); the fused form pads gathered widths to multiples of 8 (at most the dense width)."""
    model = randomise(create_model("topformer-tiny", sparsity=0.3)).eval()
    attn, mlp = model.extractor.blocks[0].attn, model.extractor.blocks[0].mlp
    assert (attn.qk_gate.keep, attn.v_gate.keep, mlp.gate.keep) == (11, 22, 291)
    pooled = torch.randn(3, attn.to_q.conv.in_channels)
    values, index = attn.qk_gate(pooled, attn.to_q.conv.weight, attn.to_k.conv.weight)
    assert values.shape == index.shape == (3, 4 * 11)
    assert all(((index[:, h * 11:(h + 1) * 11] // 16) == h).all() for h in range(4))  # per-head selection
    fused = model.fuse()
    f_attn, f_mlp = fused.extractor.blocks[0].attn, fused.extractor.blocks[0].mlp
    assert (f_attn.qk_gate.width, f_attn.v_gate.width, f_mlp.gate.width) == (16, 24, 296)


def test_executed_macs_fall_by_the_pruned_products():
    """Executed MACs (gathered path, 512×512: 8×8 tokens) drop from sparsity 0 to s by exactly the pruned 1×1
    conv, attention and depthwise products of the extractor."""
    size = (512, 512)
    N = (size[0] // 64) * (size[1] // 64)
    macs = {s: round(count_gmacs(create_model("topformer-tiny", sparsity=s), size, convention="macs") * 1e9)
            for s in (0.0, 0.3, 0.5)}
    model = create_model("topformer-tiny", sparsity=0.0)
    for s in (0.3, 0.5):
        pruned = 0
        for block in model.extractor.blocks:
            a, m = block.attn, block.mlp
            C, H = a.to_q.conv.in_channels, m.fc1.conv.out_channels
            dq = (a.key_dim - keep_count(a.key_dim, s)) * a.num_heads
            dv = (a.value_dim - keep_count(a.value_dim, s)) * a.num_heads
            dh = H - keep_count(H, s)
            pruned += 2 * N * C * dq + N * N * dq + N * C * dv + N * N * dv + N * dv * C  # q, k | q k | v | A v | proj
            pruned += N * C * dh + N * 9 * dh + N * dh * C  # fc1, depthwise 3×3, fc2
        assert macs[0.0] - macs[s] == pruned
    dense = round(count_gmacs(create_model("topformer-tiny"), size, convention="macs") * 1e9)
    assert macs[0.0] > dense  # the gates' own MACs (per image) come on top


def test_checkpoint_round_trip_and_layout(tmp_path):
    torch.manual_seed(0)
    model = randomise(create_model("topformer-tiny", num_classes=4, sparsity=0.5)).eval()
    save_checkpoint(tmp_path / "dyn.pth", model)
    loaded = load_model(tmp_path / "dyn.pth")
    assert loaded.model_args == model.model_args
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    family, sd, _ = detect_layout(model.state_dict())
    assert family == "TopFormer"
    assert infer_model(sd) == ("topformer-tiny", {"num_classes": 4, "dynamic": True})


def test_tiny_distill_run_on_scenes(tmp_path, capsys, tiny_distill_recipe):
    """``edgeseg distill`` with a TopFormer teacher trains a dynamic TopFormer through both stages."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "teacher.pth", create_model("topformer-tiny", num_classes=8))
    model = {"name": "topformer-tiny", "overrides": {"dynamic": True, "drop_path_rate": 0.0}}
    path = tiny_distill_recipe(model, crop=64)
    work = tmp_path / "run"
    code = main(["distill", str(path), "--teacher", str(tmp_path / "teacher.pth"), "--work-dir", str(work),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["mode"] == "train"]
    assert [(r["stage"], r["sparsity"]) for r in train_rows] == [(1, 0.0), (1, 0.25), (2, 0.5), (2, 0.5)]
    # stage 1 aligns the three injected maps (the student's BN runs on batch statistics, so unlike the LayerNorm
    # SegFormer the first MSE is not 0 even at sparsity 0); stage 2 adds labels and the teacher's logits
    assert all("mse" in r for r in train_rows[:2]) and all({"ce", "soft", "l1"} <= r.keys() for r in train_rows[2:])
    assert [r["mIoU"] is not None for r in rows if r["mode"] == "val"] == [True]
    student = load_model(work / "final.pth")
    assert student.model_name == "topformer-tiny" and student.model_args["sparsity"] == 0.5
    assert {g.sparsity for g in dynamic.dynamic_gates(student)} == {0.5}

    # a SegFormer teacher for a TopFormer recipe is refused with the fix
    save_checkpoint(tmp_path / "seg.pth", create_model("segformer-b0", num_classes=8, depths=[1, 1, 1, 1]))
    code = main(["distill", str(path), "--teacher", str(tmp_path / "seg.pth"), "--work-dir", str(tmp_path / "x"),
                 "--no-progress"])
    assert code == 2 and "use a topformer-tiny teacher" in capsys.readouterr().err


def test_set_sparsity_reaches_the_extractor_gates():
    model = create_model("topformer-tiny", sparsity=0.5)
    set_sparsity(model, 0.2)
    assert {g.sparsity for g in dynamic.dynamic_gates(model)} == {0.2}
