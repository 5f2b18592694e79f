"""DynaSegFormer's dynamic gated linear layer: gate and top-r, the two execution forms, the student built from a
dense SegFormer, executed MACs and export."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeseg import create_model, load_model, save_checkpoint
from edgeseg.deploy.benchmark import count_gmacs, random_weights_
from edgeseg.models import dynamic, dynasegformer
from edgeseg.models.dynamic import (
    DynamicGate,
    DynamicGatedLinear,
    SparsitySchedule,
    gate_l1,
    random_gates_,
    keep_count,
    set_gather,
    set_native,
    set_sparsity,
    top_r,
)
from edgeseg.models.dynasegformer import DynamicEfficientSelfAttention, DynamicMixFFN, from_segformer
from edgeseg.models.segformer import EfficientSelfAttention, MixFFN


def both_forms(module: nn.Module, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked dense, gathered) outputs of an eval-mode module."""
    with torch.no_grad():
        set_gather(module, False)
        masked = module(*args)
        set_gather(module, True)
        gathered = module(*args)
    return masked, gathered


# ---------------------------------------------------------------------------------------------------- gate, top-r
def test_keep_count_and_validation():
    assert keep_count(128, 0.3) == 90 and keep_count(32, 0.3) == 22 and keep_count(32, 0.5) == 16
    assert keep_count(10, 0.0) == 10 and keep_count(3, 0.99) == 1
    with pytest.raises(ValueError, match="sparsity"):
        keep_count(10, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        DynamicGatedLinear(8, 16, sparsity=-0.1)


def test_gate_shapes_and_top_r_per_head():
    torch.manual_seed(0)
    gate = DynamicGate(in_features=12, gated_features=24, sparsity=0.25, groups=3).eval()
    random_gates_(gate)
    pooled, w1 = torch.randn(4, 12), torch.randn(24, 12)
    logits = gate.predictor(pooled, (w1,), (None,))
    assert logits.shape == (4, 24)
    values, index = gate(pooled, w1)
    assert gate.keep == 6 and values.shape == index.shape == (4, 18)
    for b in range(4):
        per_head = index[b].reshape(3, 6)
        for h in range(3):  # every head keeps its own 6 largest of 8, with their values
            assert per_head[h].ge(8 * h).all() and per_head[h].lt(8 * (h + 1)).all()
            expect = logits[b, 8 * h:8 * (h + 1)].topk(6).values.sort().values
            assert torch.equal(values[b].reshape(3, 6)[h].sort().values, expect)
    m, support = dynamic.scatter_mask(values, index, 24)
    kept = support.bool()
    assert support.sum(1).eq(18).all()
    assert torch.equal(m[kept], logits[kept]) and m[~kept].eq(0).all()
    # The gate reads W1: a different first weight changes the gate for the same pooled input.
    assert not torch.allclose(gate.predictor(pooled, (w1 * 2,), (None,)), logits)


def test_top_r_keeps_largest_with_values():
    g = torch.tensor([[0.25, 3.0, -1.0, 2.0, 0.5, 4.0]])
    values, index = top_r(g, 3)
    assert sorted(index[0].tolist()) == [1, 3, 5] and torch.equal(values, g.gather(1, index))
    values, index = top_r(g, 2, groups=2)  # group-major: the first two from [0.25, 3, -1], then from [2, 0.5, 4]
    assert sorted(index[0, :2].tolist()) == [0, 1] and sorted(index[0, 2:].tolist()) == [3, 5]
    assert torch.equal(values, g.gather(1, index))


def test_top_r_breaks_ties_by_the_lower_index():
    g = torch.tensor([[1.0, 2.0, 2.0, 1.0, 2.0, 1.0]])
    assert top_r(g, 2)[1].tolist() == [[1, 2]]
    values, index = top_r(g, 2, width=4)  # padded: the same two kept, then the next two ranked, with value 0
    assert index.tolist() == [[1, 2, 4, 0]] and values.tolist() == [[2.0, 2.0, 0.0, 0.0]]


def test_sparsity_annealing_schedule():
    sched = SparsitySchedule(0.5, anneal_steps=100)
    assert [sched(t) for t in (0, 25, 50, 100, 1000)] == [0.0, 0.125, 0.25, 0.5, 0.5]
    assert SparsitySchedule(0.3, 0)(0) == 0.3
    model = create_model("dynasegformer-b0", num_classes=4, sparsity=0.5)
    set_sparsity(model, sched(30))
    assert {g.sparsity for g in dynamic.dynamic_gates(model)} == {0.15}
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.2"):
        SparsitySchedule(1.2, 10)


# ------------------------------------------------------------------------------------------- dense equivalence
def test_dgl_at_sparsity_zero_is_the_dense_layer():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(16, 64), nn.Linear(64, 24)
    dgl = DynamicGatedLinear.from_dense(fc1, fc2, sparsity=0.0)
    x = torch.randn(2, 10, 16)
    dense = fc2(F.gelu(fc1(x)))
    assert torch.equal(dgl.train()(x), dense)  # masked form: G ≡ 1 at initialisation multiplies exactly
    with torch.no_grad():
        assert (dgl.eval()(x) - dense).abs().max() <= 1e-6  # gathered form: same products, other summation order


def test_student_from_dense_segformer_at_sparsity_zero_reproduces_teacher():
    torch.manual_seed(0)
    teacher = create_model("segformer-b0", num_classes=7).eval()
    with torch.no_grad():  # non-trivial BN statistics in the decoder
        bn = teacher.decode_head.linear_fuse.bn
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    student = from_segformer(teacher, sparsity=0.0).eval()
    assert student.model_name == "dynasegformer-b0" and student.model_args == {"num_classes": 7, "sparsity": 0.0}
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits = teacher(x)
        masked, gathered = both_forms(student, x)
        feats_t, feats_s = teacher.forward_features(x), student.forward_features(x)
    assert (masked - logits).abs().max() <= 1e-5 and (gathered - logits).abs().max() <= 1e-5
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(feats_t, feats_s))
    # at 30 % the student computes something else (it is pruned), but from the same weights
    set_sparsity(student, 0.3)
    with torch.no_grad():
        assert (student(x) - logits).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------- masked == gathered
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_masked_equals_gathered_layers(sparsity):
    torch.manual_seed(0)
    hw = (6, 10)
    x = torch.randn(2, 60, 40)
    for dense in (EfficientSelfAttention(40, num_heads=4, sr_ratio=2), EfficientSelfAttention(40, 5, sr_ratio=1)):
        attn = DynamicEfficientSelfAttention.from_dense(dense, sparsity).eval()
        random_gates_(attn)
        masked, gathered = both_forms(attn, x, hw)
        assert (masked - gathered).abs().max() <= 1e-6
        # the two images keep different channels, and each runs alone the same as in the batch
        _, idx = attn.qk_gate(x.mean(1), attn.q.weight, attn.kv.weight)
        assert not torch.equal(idx[0], idx[1])
        with torch.no_grad():
            assert (attn(x[1:], hw) - gathered[1:]).abs().max() <= 1e-5
    ffn = DynamicMixFFN.from_dense(MixFFN(40, 160), sparsity).eval()
    random_gates_(ffn)
    masked, gathered = both_forms(ffn, x, hw)
    assert (masked - gathered).abs().max() <= 1e-5
    with torch.no_grad():
        assert (ffn(x[:1], hw) - gathered[:1]).abs().max() <= 1e-5
    dgl = DynamicGatedLinear(40, 96, sparsity=sparsity).eval()
    random_gates_(dgl)
    masked, gathered = both_forms(dgl, x)
    assert (masked - gathered).abs().max() <= 1e-5


def test_attention_plan_with_unequal_qk_and_v_sparsity():
    """The attention plan runs one Top-r over both gates when they keep equally many channels per head; a user may
    set them apart, and then both forms must still agree (and the kept widths really differ)."""
    torch.manual_seed(0)
    hw = (6, 10)
    x = torch.randn(2, 60, 40)
    attn = DynamicEfficientSelfAttention.from_dense(EfficientSelfAttention(40, 4, sr_ratio=2), 0.3).eval()
    random_gates_(attn)
    attn.v_gate.sparsity = 0.5
    assert attn.qk_gate.keep != attn.v_gate.keep
    masked, gathered = both_forms(attn, x, hw)
    assert (masked - gathered).abs().max() <= 1e-5
    w_q, _, w_kv, _, w_proj = attn.plan(x)
    assert w_q.shape[0] == 2 * 4 * attn.qk_gate.keep and w_proj.shape[1] == 2 * 4 * attn.v_gate.keep
    assert w_kv.shape[0] == w_q.shape[0] + w_proj.shape[1]


@pytest.mark.parametrize("gates", ["random", "fresh"])  # fresh: every gate value 1, all neurons tie
def test_masked_equals_gathered_whole_model_batch2_and_fused(gates):
    torch.manual_seed(0)
    model = create_model("dynasegformer-b0", num_classes=5, sparsity=0.3).eval()
    if gates == "random":
        random_gates_(model)
    x = torch.randn(2, 3, 64, 64)
    masked, gathered = both_forms(model, x)
    assert masked.shape == (2, 5, 16, 16)
    assert (masked - gathered).abs().max() <= 1e-5
    with torch.no_grad():
        fused = model.fuse()  # padded widths, native plans where they build
        assert (fused(x) - gathered).abs().max() <= 1e-5
        set_native(fused, False)
        assert (fused(x) - gathered).abs().max() <= 1e-5
    # pruning is real: at 30 % the model differs from its own dense (sparsity 0) form
    set_sparsity(model, 0.0)
    with torch.no_grad():
        assert (model(x) - gathered).abs().max() > 1e-3


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_every_form_computes_the_masked_function_float64(sparsity):
    """With weights, BN statistics and gates all non-trivial (logits ~6, per-image channels), gathered, fused and
    unpadded forms compute the masked function itself: in float64 they differ by rounding only, batch or not.
    (In float32 each form, the masked one included, is up to ~5e-5 from this exact result at these logits, and
    two of them differ by up to ~4e-5; the 1e-5 of the test above holds at the library's own initialisation.)"""
    model = random_gates_(random_weights_(create_model("dynasegformer-b0", num_classes=19, sparsity=sparsity), 3), 4)
    model = model.eval().double()
    x = torch.randn(3, 3, 97, 131, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    masked, gathered = both_forms(model, x)
    with torch.no_grad():
        fused, unpadded = model.fuse()(x), model.fuse(pad_multiple=1)(x)
        alone = model(x[1:2])
    assert masked.abs().max() > 1
    for out in (gathered, fused, unpadded):
        assert (out - masked).abs().max() <= 1e-10
    assert (alone - gathered[1:2]).abs().max() <= 1e-10  # each image keeps its own channels, batch or not


def test_pruned_neurons_are_not_consumed():
    """A pruned hidden channel must not reach fc2 even though the depthwise conv's bias makes it non-zero."""
    torch.manual_seed(0)
    ffn = DynamicMixFFN(8, 32, sparsity=0.5).train()
    random_gates_(ffn)
    with torch.no_grad():
        ffn.dwconv.bias.fill_(3.0)
    x, hw = torch.randn(1, 12, 8), (3, 4)
    values, index = ffn.gate(x.mean(1), ffn.fc1.weight)
    pruned = sorted(set(range(32)) - set(index[0].tolist()))
    out = ffn(x, hw)
    with torch.no_grad():
        ffn.fc2.weight[:, pruned] += 100.0  # changing what only pruned channels would feed changes nothing
    assert torch.equal(ffn(x, hw), out)


def test_gate_l1_and_gradients_reach_the_gate():
    torch.manual_seed(0)
    model = create_model("dynasegformer-b0", num_classes=3, sparsity=0.3).train()
    random_gates_(model)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    gates = [g.last_gate for g in dynamic.dynamic_gates(model)]
    assert len(gates) == 3 * 8 and all(g is not None and g.shape[0] == 2 for g in gates)
    expect = sum(g.abs().sum(1).mean() for g in gates)
    l1 = gate_l1(model)
    assert torch.allclose(l1, expect)
    (out.square().mean()).backward()  # through the kept gate values only (no L1 here)
    ffn_gate = model.encoder.stages[0].blocks[0].mlp.gate.predictor
    assert ffn_gate.fc2.weight.grad is not None and ffn_gate.fc2.weight.grad.abs().sum() > 0
    fused = model.fuse()  # right after a training step: the stored gates are not copied
    assert all(g.last_gate is None for g in dynamic.dynamic_gates(fused))
    model.eval()
    with torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="training-mode forward"):
        gate_l1(model)


# ---------------------------------------------------------------------------------------------------- GMACs
def _gated_macs(model: nn.Module, size: tuple[int, int], sparsity: float) -> int:
    """MACs of the products the gates prune, for the encoder of ``model`` at ``sparsity`` (the counted model)."""
    total = 0
    h, w = size
    for i, stage in enumerate(model.encoder.stages):
        h, w = ((h + 3) // 4, (w + 3) // 4) if i == 0 else ((h + 1) // 2, (w + 1) // 2)  # patch-embed strides
        N = h * w
        for block in stage.blocks:
            attn, mlp = block.attn, block.mlp
            C, sr = attn.q.in_features, attn.sr_ratio
            M = (h // sr) * (w // sr)
            kq = kv = keep_count(attn.head_dim, sparsity) * attn.num_heads  # kept Q/K and V channels, all heads
            kf = keep_count(mlp.fc1.out_features, sparsity)
            total += N * C * kq + M * C * (kq + kv)  # q, kv
            total += N * M * kq + N * M * kv  # Q Kᵀ, A V
            total += N * kv * C  # proj
            total += N * C * kf + N * kf * 9 + N * kf * C  # fc1, depthwise 3×3, fc2
    return total


def _gate_macs(model: nn.Module) -> int:
    """Per-image MACs of every gate predictor: ``X̂ · W1`` over the rows of ``W1``, then the two-layer MLP."""
    total = 0
    for gate in dynamic.dynamic_gates(model):
        p = gate.predictor
        C = p.norm.normalized_shape[0]
        for rows in gate.rows:  # None: the whole W1 (n rows); (a, b): a row range of the ``kv`` weight
            total += C * (gate.gated_features if rows is None else rows[1] - rows[0])
        total += p.fc1.in_features * p.fc1.out_features + p.fc2.in_features * p.fc2.out_features
    return total


def test_executed_macs_shrink_as_the_counted_model_says():
    """At the paper's setting (B0, 512×512): the executed MACs (gathered path) fall exactly by the pruned products,
    the additive decoder removes exactly the 4E → E fuse conv at 1/4 resolution, and the totals round to the
    paper's figures (MAC-only convention: the paper's counter charges no element-wise ops here)."""
    size = (512, 512)
    dense = create_model("segformer-b0")
    macs = {s: count_gmacs(create_model("dynasegformer-b0", sparsity=s), size, convention="macs") * 1e9
            for s in (0.0, 0.3, 0.5)}
    model = create_model("dynasegformer-b0", sparsity=0.0)
    for s in (0.3, 0.5):
        expect = _gated_macs(model, size, 0.0) - _gated_macs(model, size, s)
        assert round(macs[0.0] - macs[s]) == expect
    E = dense.decode_head.embed_dim
    fuse_conv = 4 * E * E * (size[0] // 4) * (size[1] // 4)
    dense_macs = count_gmacs(dense, size, convention="macs") * 1e9
    assert round(dense_macs - macs[0.0]) == fuse_conv - _gate_macs(model)
    assert macs[0.0] > macs[0.3] > macs[0.5]
    # The paper's B0 figures (8.4 → 3.3 at 30 %, 2.7 at 50 %) are stated to 0.1 GMAC.
    paper = dynasegformer.PAPER["dynasegformer-b0"]["gmacs_at_sparsity"]
    assert round(macs[0.3] / 1e9, 1) == paper["0.3"] and round(macs[0.5] / 1e9, 1) == paper["0.5"]


# ------------------------------------------------------------------------------------------ checkpoint, export
def test_layout_claim_and_infer_model():
    model = create_model("dynasegformer-b0", num_classes=19, sparsity=0.5)
    sd = model.state_dict()
    converted, notes = dynasegformer.convert_state_dict(sd)
    assert converted.keys() == sd.keys() and notes == []
    assert dynasegformer.infer_model(sd) == ("dynasegformer-b0", {"num_classes": 19})
    assert dynasegformer.convert_state_dict(create_model("segformer-b0").state_dict()) is None
    with pytest.raises(ValueError, match="must be a SegFormer"):
        from_segformer(model)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("dynasegformer-b0", num_classes=4, sparsity=0.5).eval()
    random_gates_(model)
    save_checkpoint(tmp_path / "dyna.pth", model)
    loaded = load_model(tmp_path / "dyna.pth")
    assert loaded.model_name == "dynasegformer-b0" and loaded.model_args["sparsity"] == 0.5
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("fused, gates", [(False, "random"), (True, "random"), (True, "fresh")])
def test_onnx_export_matches(tmp_path, fused, gates):
    """Both inference forms export: the eval model (trainable gates) and ``fuse()`` (folded gates, padded widths).
    Fresh gates tie everywhere: ONNX's TopK keeps the lower indices, as PyTorch's Top-r does."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = create_model("dynasegformer-b0", num_classes=5, sparsity=0.3, depths=[1, 1, 1, 1]).eval()
    if gates == "random":
        random_gates_(model)
    if fused:
        model = model.fuse()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "dyna.onnx"
    with warnings.catch_warnings():  # the batch-of-one fast path is a shape branch, fixed at export
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(copy.deepcopy(model), (x,), str(path), dynamo=False, opset_version=17)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"TopK", "Gather"} <= ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(out - ref.numpy()).max() <= 1e-5


def test_folded_gates_compute_the_predictors():
    """fuse() freezes each gate: LN affine, W1 and the first MLP layer become one matrix; attention's two gates
    become one block-diagonal gate. Same gate logits as the trainable predictors."""
    torch.manual_seed(0)
    attn = DynamicEfficientSelfAttention.from_dense(EfficientSelfAttention(40, 4, sr_ratio=2), 0.3).eval()
    random_gates_(attn)
    with torch.no_grad():
        for g in (attn.qk_gate, attn.v_gate):
            g.predictor.norm.weight.uniform_(0.5, 1.5)
            g.predictor.norm.bias.normal_()
        pooled = torch.randn(3, 40)
        qk = attn.qk_gate.predictor(pooled, (attn.q.weight, attn.kv.weight), attn.qk_gate.rows)
        v = attn.v_gate.predictor(pooled, (attn.kv.weight,), attn.v_gate.rows)
        attn.fold_gates()
        assert (attn.qk_gate.folded(pooled) - qk).abs().max() <= 1e-5
        assert (attn.joint_gate(pooled) - torch.cat([qk, v], dim=1)).abs().max() <= 1e-5
    assert not any("folded" in k or "joint" in k for k in attn.state_dict())  # inference-only, never saved


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_padded_widths_are_exact_zero_neurons(sparsity):
    """The fused form rounds every gathered width up to a multiple of 8 with zero-valued slots; each site makes a
    padding slot contribute nothing, even where φ(0) ≠ 0 or a bias follows the gate value."""
    torch.manual_seed(0)
    hw = (6, 10)
    x = torch.randn(2, 60, 40)
    attn = DynamicEfficientSelfAttention.from_dense(EfficientSelfAttention(40, 4, sr_ratio=2), sparsity).eval()
    ffn = DynamicMixFFN.from_dense(MixFFN(40, 160), sparsity).eval()
    dgl = DynamicGatedLinear(40, 100, act=nn.Sigmoid, sparsity=sparsity).eval()  # sigmoid(0) = 0.5
    with torch.no_grad():
        ffn.dwconv.bias.fill_(3.0)
    for module, args in ((attn, (x, hw)), (ffn, (x, hw)), (dgl, (x,))):
        random_gates_(module)
        masked, _ = both_forms(module, *args)
        dynamic.fold_gates(module, pad_multiple=8)
        gates = list(dynamic.dynamic_gates(module))
        assert all(g.width % 8 == 0 or g.width == g.gated_features // g.groups for g in gates)
        with torch.no_grad():
            assert (module(*args) - masked).abs().max() <= 1e-5
    assert (attn.qk_gate.keep, attn.qk_gate.width) == ((7, 8) if sparsity == 0.3 else (5, 8))
    assert (ffn.gate.keep, ffn.gate.width) == ((112, 112) if sparsity == 0.3 else (80, 80))
    assert (dgl.gate.keep, dgl.gate.width) == ((70, 72) if sparsity == 0.3 else (50, 56))
    # the scores read only the kept Q/K channels of each padded head; V keeps its padded width
    seen = []
    real_attend = attn.attend
    attn.attend = lambda q, k, v: seen.append((q.shape[-1], k.shape[-1], v.shape[-1])) or real_attend(q, k, v)
    with torch.no_grad():
        attn(x, hw)
    assert seen == [(attn.qk_gate.keep, attn.qk_gate.keep, attn.v_gate.width)]
    # the padding slots carry value 0 and come after the kept ones in each group
    values, _ = top_r(torch.randn(2, 16), keep=5, groups=2, width=8)
    assert torch.equal((values.reshape(2, 2, 8)[..., 5:] == 0).all(-1), torch.ones(2, 2, dtype=torch.bool))
    assert (values.reshape(2, 2, 8)[..., :5] != 0).all()
    # training never pads
    assert dgl.train().gate.width == dgl.gate.keep


def test_fused_b0_pads_to_kernel_widths_and_counts_the_padding():
    """At 30 % on B0 the kept widths 22 (per head) and 90/179/448/717 (Mix-FFN) run as 24 and 96/184/448/720 in the
    fused model, which executes (and counts) the padding; ``pad_multiple=1`` executes the paper's pruned widths."""
    torch.manual_seed(0)
    model = create_model("dynasegformer-b0", num_classes=5, sparsity=0.3).eval()
    random_gates_(model)
    fused = model.fuse()
    block = fused.encoder.stages[0].blocks[0]
    assert (block.attn.qk_gate.keep, block.attn.qk_gate.width) == (22, 24)
    assert [s.blocks[0].mlp.gate.width for s in fused.encoder.stages] == [96, 184, 448, 720]
    x = torch.randn(2, 3, 64, 64)
    unpadded = model.fuse(pad_multiple=1)
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max() <= 1e-5
        assert (unpadded(x) - model(x)).abs().max() <= 1e-5
    assert count_gmacs(fused, (64, 64), convention="macs") > count_gmacs(unpadded, (64, 64), convention="macs")
    # the padding masks are built once and cached: one first built under inference_mode must not break a later
    # forward with autograd on (e.g. a saliency map through the fused model)
    dynamic._slot_support.cache_clear()
    with torch.inference_mode():
        fused(x)
    y = x.clone().requires_grad_(True)
    fused(y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_dense_weights_load_into_their_gated_form_only_where_the_two_correspond():
    from edgeseg.models.dynamic import load_dense

    dense = nn.Module()
    dense.fc1, dense.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    gated = DynamicGatedLinear(8, 16)
    load_dense(gated, dense, "a DGL")  # only the gate's own tensors are new
    assert torch.equal(gated.fc2.weight, dense.fc2.weight)
    dense.extra = nn.Linear(2, 2)
    unexpected = r"do not fit a DGL: missing \[\], unexpected \['extra.weight', 'extra.bias'\]"
    with pytest.raises(ValueError, match=unexpected):
        load_dense(gated, dense, "a DGL")
    del dense.extra, dense.fc2
    with pytest.raises(ValueError, match=r"missing \['fc2.weight', 'fc2.bias'\]"):
        load_dense(gated, dense, "a DGL")
