"""SegFormer / MiT: parity with the official NVlabs code, key layouts, paper figures, fusion."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgeseg.deploy.benchmark import random_weights_
from edgeseg.models import segformer as S
from edgeseg.models.dynamic import random_gates_
from edgeseg.models.dynasegformer import from_segformer
from edgeseg.models.layers import upsample_logits

REF = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference"
FIXTURE = REF / "segformer-b0_nvlabs_ade20k-150_1x3x512x512_seed0"
VARIANTS = ["b0", "b1", "b2", "b3", "b4", "b5"]


def _read_tsv(path: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        sd[key] = torch.empty(json.loads(shape), device="meta")
    return sd


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------------------
# Parity with the official code (fixture made by NVlabs/SegFormer)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_b0():
    if not (FIXTURE / "checkpoint.pth").is_file():
        pytest.skip(f"reference fixture not found at {FIXTURE}")
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    ckpt = torch.load(FIXTURE / "checkpoint.pth", map_location="cpu", weights_only=True)
    sd, notes = S.convert_state_dict(ckpt["state_dict"])
    name, args = S.infer_model(sd)
    model = S.MODELS[name](**args).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.load(REF / "inputs" / "input_1x3x512x512_seed0.pt", weights_only=True)
    with torch.inference_mode():
        logits = model(x)
        fused_logits = model.fuse()(x)
    return dict(name=name, args=args, notes=notes, manifest=manifest, x=x, logits=logits, fused=fused_logits,
                ref_native=torch.load(FIXTURE / "logits_native.pt", weights_only=True),
                ref_subgrid=torch.load(FIXTURE / "logits_upsampled_subgrid.pt", weights_only=True),
                ref_argmax=torch.load(FIXTURE / "pred_argmax.pt", weights_only=True))


def test_official_checkpoint_is_recognised(official_b0):
    assert official_b0["name"] == "segformer-b0"
    assert official_b0["args"] == {"num_classes": 150}
    assert any("conv_seg" in n for n in official_b0["notes"])


@pytest.mark.parametrize("form", ["logits", "fused"])
def test_official_native_logits(official_b0, form):
    out, ref = official_b0[form], official_b0["ref_native"]
    assert out.shape == ref.shape == (1, 150, 128, 128)
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("form", ["logits", "fused"])
def test_official_upsampled_logits_and_labels(official_b0, form):
    spec = official_b0["manifest"]["outputs"]["logits_upsampled_subgrid"]
    full = upsample_logits(official_b0[form], official_b0["x"].shape[2:])
    sub = full[:, :, spec["rows"]][:, :, :, spec["cols"]]
    assert (sub - official_b0["ref_subgrid"]).abs().max().item() <= 1e-4
    top2 = full.topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1])
    differ = full.argmax(dim=1) != official_b0["ref_argmax"].long()
    assert not (differ & (margin >= 2e-4)).any()


# --------------------------------------------------------------------------------------------------------------
# Checkpoint layouts
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_keys_and_shapes_map_onto_ours(variant):
    tsv = REF / "state_dict_keys" / f"segformer-{variant}_nvlabs_ade20k-150.tsv"
    if not tsv.is_file():
        pytest.skip(f"{tsv} not found")
    official = _read_tsv(tsv)
    converted, notes = S.convert_state_dict(official)
    with torch.device("meta"):
        model = S.MODELS[f"segformer-{variant}"]()
    assert _shapes(converted) == _shapes(model.state_dict())
    assert {"decode_head.conv_seg.weight", "decode_head.conv_seg.bias"} <= set(official)
    assert len(converted) == len(official) - 2  # only the unused conv_seg is dropped
    assert S.infer_model(converted) == (f"segformer-{variant}", {"num_classes": 150})


@pytest.mark.parametrize("variant", ["b0", "b2", "b5"])
def test_imagenet_mit_file_maps_onto_mit_and_segformer_encoder(variant):
    tsv = REF / "state_dict_keys" / f"segformer-{variant}_nvlabs_ade20k-150.tsv"
    if not tsv.is_file():
        pytest.skip(f"{tsv} not found")
    # mit_bX.pth holds the backbone keys without the ``backbone.`` prefix, plus the ImageNet head.
    official = {k[len("backbone."):]: v for k, v in _read_tsv(tsv).items() if k.startswith("backbone.")}
    width = S.VARIANTS[variant]["embed_dims"][-1]
    official["head.weight"] = torch.empty(1000, width, device="meta")
    official["head.bias"] = torch.empty(1000, device="meta")
    converted, _ = S.convert_state_dict(official)
    with torch.device("meta"):
        mit = S.MODELS[f"mit-{variant}"]()
        seg = S.MODELS[f"segformer-{variant}"]()
    assert _shapes(converted) == _shapes(mit.state_dict())
    assert S.infer_model(converted) == (f"mit-{variant}", {"num_classes": 1000})
    encoder = {k: v for k, v in _shapes(converted).items() if not k.startswith("head.")}
    seg_shapes = _shapes(seg.state_dict())
    assert all(seg_shapes.get(k) == s for k, s in encoder.items())  # ImageNet weights initialise the encoder


def test_own_layout_passes_through_and_foreign_layouts_are_refused():
    model = S.segformer_b0(num_classes=19)
    sd = model.state_dict()
    converted, notes = S.convert_state_dict(sd)
    assert converted.keys() == sd.keys() and notes == []
    assert S.convert_state_dict(S.mit_b0().state_dict())[0].keys() == S.mit_b0().state_dict().keys()
    assert S.convert_state_dict({"tpm.stem.0.c.weight": torch.zeros(16, 3, 3, 3)}) is None
    # a model extending our layout (DynaSegFormer's gates) is left to its own family's converter
    extended = {**sd, "encoder.stages.0.blocks.0.mlp.gate.predictor.fc1.weight": torch.zeros(16, 32)}
    assert S.convert_state_dict(extended) is None
    assert S.convert_state_dict({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}) is None


def test_infer_model_rebuilds_custom_shapes():
    overrides = dict(embed_dims=[16, 32, 80, 128], depths=[1, 2, 1, 1], decoder_dim=48, sr_ratios=[4, 2, 1, 1])
    model = S.segformer_b2(num_classes=19, **overrides)
    name, args = S.infer_model(model.state_dict())
    assert name == "segformer-b0"  # no variant has these widths: the B0 base plus overrides
    rebuilt = S.MODELS[name](**args)
    assert _shapes(rebuilt.state_dict()) == _shapes(model.state_dict())
    assert args["num_classes"] == 19 and args["decoder_dim"] == 48 and args["depths"] == [1, 2, 1, 1]
    assert json.loads(json.dumps(model.model_args)) == {"num_classes": 19, **overrides}


def test_builder_rejects_unknown_overrides():
    with pytest.raises(ValueError, match="head_channels"):
        S.segformer_b0(head_channels=128)
    with pytest.raises(ValueError, match="decoder_dim"):
        S.mit_b0(decoder_dim=128)


# --------------------------------------------------------------------------------------------------------------
# Official semantics the fixtures cannot see
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ln_eps", [None, 1e-5])
def test_layernorm_eps(ln_eps):
    kwargs = {} if ln_eps is None else {"ln_eps": ln_eps}
    with torch.device("meta"):
        model = S.segformer_b1(**kwargs)
    block_eps = 1e-6 if ln_eps is None else ln_eps
    checked = set()
    for stage in model.encoder.stages:
        assert stage.patch_embed.norm.eps == 1e-5
        assert stage.norm.eps == block_eps
        checked |= {id(stage.patch_embed.norm), id(stage.norm)}
        for block in stage.blocks:
            assert block.norm1.eps == block.norm2.eps == block_eps
            checked |= {id(block.norm1), id(block.norm2)}
            if block.attn.sr_ratio > 1:
                assert block.attn.norm.eps == 1e-5
                checked.add(id(block.attn.norm))
    all_norms = {id(m) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    assert all_norms == checked


def test_attention_scale_and_kv_order():
    """softmax(q kᵀ / √d) v with K = first C rows of ``kv``, V = last C rows, keys from the sr conv + LayerNorm."""
    torch.manual_seed(0)
    attn = random_weights_(S.EfficientSelfAttention(dim=16, num_heads=2, sr_ratio=2)).eval()
    hw = (6, 4)
    x = torch.randn(2, 24, 16)
    red = nn.functional.conv2d(x.transpose(1, 2).reshape(2, 16, *hw), attn.sr.weight, attn.sr.bias, stride=2)
    red = nn.functional.layer_norm(red.flatten(2).transpose(1, 2), (16,), attn.norm.weight, attn.norm.bias, 1e-5)
    kv = red @ attn.kv.weight.T + attn.kv.bias
    q = x @ attn.q.weight.T + attn.q.bias
    outs = []
    for h in range(2):
        sl = slice(8 * h, 8 * h + 8)
        k, v = kv[..., :16][..., sl], kv[..., 16:][..., sl]
        outs.append(torch.softmax(q[..., sl] @ k.transpose(1, 2) / math.sqrt(8), dim=-1) @ v)
    expected = torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        assert torch.allclose(attn(x, hw), expected, atol=1e-5)
        assert torch.allclose(attn.fuse()(x, hw), expected, atol=1e-5)


def test_mixffn_uses_depthwise_conv_and_exact_gelu():
    torch.manual_seed(0)
    ffn = random_weights_(S.MixFFN(8, 32)).eval()
    hw = (5, 3)
    x = torch.randn(1, 15, 8)
    h = x @ ffn.fc1.weight.T + ffn.fc1.bias
    h = nn.functional.conv2d(h.transpose(1, 2).reshape(1, 32, *hw), ffn.dwconv.weight, ffn.dwconv.bias, padding=1,
                             groups=32).flatten(2).transpose(1, 2)
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    expected = h @ ffn.fc2.weight.T + ffn.fc2.bias
    with torch.no_grad():
        assert torch.allclose(ffn(x, hw), expected, atol=1e-5)


def test_drop_path_rises_linearly_over_all_blocks():
    with torch.device("meta"):
        model = S.segformer_b2()
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.encoder.stages for b in s.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, sum(S.VARIANTS["b2"]["depths"])).tolist())


# --------------------------------------------------------------------------------------------------------------
# Paper figures
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_params_match_paper(variant):
    name = f"segformer-{variant}"
    with torch.device("meta"):
        model = S.MODELS[name]()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - S.PAPER[name]["params_m"]) <= 0.05


@pytest.mark.parametrize("variant", VARIANTS)
def test_gmacs_match_paper(variant):
    """flop_counter's MACs are the convs, linears and the attention products; the paper's figures come from
    mmcv 1.2.7's counter (tools/get_flops.py), which also counts conv biases and ReLU outputs, plus ``sra_flops``
    for the attention products. Counted on the meta device (shapes only).

    flop_counter alone gives 8.39 / 15.88 / 62.34 / 78.96 / 95.57 / 183.14: B0, B1, B3 round to the paper; B2,
    B4, B5 are 0.06-0.16 GMACs under it, which is exactly the bias and ReLU terms.
    """
    name = f"segformer-{variant}"
    H, W = S.PAPER[name]["input_size"]
    with torch.device("meta"):
        model = S.MODELS[name]().eval()
    terms = {"conv": 0, "linear": 0, "bias": 0, "relu": 0}

    def conv_hook(m, _, out):
        positions = out.shape[0] * out.shape[2] * out.shape[3]
        terms["conv"] += positions * m.out_channels * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        terms["bias"] += positions * m.out_channels if m.bias is not None else 0

    def linear_hook(m, inp, out):
        terms["linear"] += inp[0].numel() * m.out_features

    def relu_hook(m, _, out):
        terms["relu"] += out.numel()

    hooks = {nn.Conv2d: conv_hook, nn.Linear: linear_hook, nn.ReLU: relu_hook}
    handles = [m.register_forward_hook(hooks[type(m)]) for m in model.modules() if type(m) in hooks]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, H, W, device="meta"))
    for h in handles:
        h.remove()
    attention = 0  # get_flops.py's sra_flops: q·kᵀ and attn·v, N × N/R² × C each
    for i, stage in enumerate(model.encoder.stages):
        h, w, r = H // 4 // 2**i, W // 4 // 2**i, stage.blocks[0].attn.sr_ratio
        attention += 2 * (h * w) * (h // r) * (w // r) * S.VARIANTS[variant]["embed_dims"][i] * len(stage.blocks)
    macs = counter.get_total_flops() / 2
    assert macs == terms["conv"] + terms["linear"] + attention
    paper_convention = (macs + terms["bias"] + terms["relu"]) / 1e9
    assert round(paper_convention, 1) == S.PAPER[name]["gmacs"]


# --------------------------------------------------------------------------------------------------------------
# Shapes, fusion, the ImageNet form
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_b0():
    return random_weights_(S.segformer_b0(num_classes=19), seed=1).eval()


@pytest.mark.parametrize("shape", [(1, 3, 65, 97), (2, 3, 64, 64)])
def test_shapes_and_fuse_equivalence(random_b0, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    fused = random_b0.fuse()
    with torch.inference_mode():
        feats = random_b0.forward_features(x)
        logits = random_b0(x)
        fused_logits = fused(x)
    sizes = [(shape[2], shape[3])]
    for stride in (4, 2, 2, 2):
        k = 7 if stride == 4 else 3
        h, w = sizes[-1]
        sizes.append(((h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1))
    assert [tuple(f.shape) for f in feats] == [(shape[0], c, *s) for c, s in zip((32, 64, 160, 256), sizes[1:])]
    assert logits.shape == (shape[0], 19, (shape[2] - 1) // 4 + 1, (shape[3] - 1) // 4 + 1)
    assert (fused_logits - logits).abs().max().item() <= 1e-5
    assert isinstance(fused.decode_head, S.AdditiveMLPDecoder) and not hasattr(fused.decode_head, "linear_fuse")
    assert fused.decode_head.linear_pred.out_channels == 24  # 19 classes padded to 24, sliced off in forward
    assert fused.model_name == "segformer-b0" and fused.model_args == {"num_classes": 19}
    assert isinstance(random_b0.decode_head, S.MLPDecoder)  # fuse() leaves the original untouched


@pytest.mark.parametrize("hw", [(3, 70), (70, 3), (1, 1), (28, 40)])
def test_a_map_thinner_than_one_reduction_window_is_zero_padded_to_it(random_b0, hw):
    """Under ~29 px on a side the stage-1 map is narrower than the 8×8 sequence-reduction window, which the official
    conv refuses: the tokens are zero-padded to one window, in every form, and the output keeps its usual size."""
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(3))
    dynamic = random_gates_(from_segformer(random_b0, 0.3))
    with torch.inference_mode():
        logits = random_b0(x)
        assert logits.shape == (2, 19, (hw[0] - 1) // 4 + 1, (hw[1] - 1) // 4 + 1)
        assert (random_b0.fuse()(x) - logits).abs().max() <= 1e-5
        assert (dynamic.fuse()(x) - dynamic(x)).abs().max() <= 1e-5
    attn = random_b0.encoder.stages[0].blocks[0].attn
    tokens = torch.randn(1, 3 * 5, 32)
    padded = torch.zeros(1, 8, 8, 32)
    padded[:, :3, :5] = tokens.reshape(1, 3, 5, 32)
    with torch.no_grad():
        assert (attn.reduce(tokens, (3, 5)) - attn.reduce(padded.reshape(1, 64, 32), (8, 8))).abs().max() <= 1e-6


def test_additive_decoder_folds_its_batchnorm():
    torch.manual_seed(0)
    dec = random_weights_(S.AdditiveMLPDecoder([8, 16, 24, 32], 12, 5, batch_norm=True), seed=3).eval()
    feats = [torch.randn(2, c, 12 // 2**i + 1, 20 // 2**i) for i, c in enumerate([8, 16, 24, 32])]
    fused = dec.fuse()
    assert isinstance(fused.bn, nn.Identity) and fused.linear_pred.out_channels == 8  # 5 classes padded to 8
    with torch.no_grad():
        assert (fused(feats) - dec(feats)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_resize_rows_equals_rows_of_the_whole_resize(scale):
    y = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(scale))
    H, W = 5 * scale, 11
    whole = S.resize(y, (H, W))
    for band in (1, 3, 8):
        for r0 in range(0, H, band):
            r1 = min(H, r0 + band)
            assert torch.equal(S._resize_rows(y, H, W, r0, r1), whole[:, :, r0:r1])


@pytest.mark.parametrize("heights, banded", [
    ((40, 20, 10, 5), True),  # ratios 2, 4, 8: in bands
    ((36, 18, 9, 5), False),  # 36 / 5 is not an integer: whole
    ((48, 24, 16, 6), False),  # 48 / 16 = 3 is not a power of two: whole
    ((8, 4, 2, 1), False),  # no taller than one band: whole
])
def test_decoder_runs_in_row_bands_in_eval_mode_only(heights, banded):
    dec = random_weights_(S.AdditiveMLPDecoder([8, 16, 24, 32], 12, 5, batch_norm=True), seed=5).eval()
    dec.row_band = 8
    gen = torch.Generator().manual_seed(6)
    feats = [torch.randn(2, c, h, 3 + h // 2, generator=gen) for c, h in zip([8, 16, 24, 32], heights)]
    feats[0] = feats[0].to(memory_format=torch.channels_last)  # the layout the encoder hands over
    calls = []
    dec._forward_in_bands = lambda f: calls.append(1) or S.AdditiveMLPDecoder._forward_in_bands(dec, f)
    with torch.no_grad():
        out = dec(feats)
        dec.row_band = 0
        whole = dec(feats)
    assert bool(calls) == banded
    assert out.shape == whole.shape == (2, 5, heights[0], 3 + heights[0] // 2)
    # The resizes are bit-identical (above); the band-sized products may round differently in another BLAS.
    assert (out - whole).abs().max().item() <= 1e-6
    dec.row_band, calls[:] = 8, []
    dec.train()(feats)  # training: BN normalises with batch statistics, over the whole map
    assert not calls


def test_decoder_in_eval_mode_backpropagates_to_its_input():
    # Saliency maps and attacks differentiate an eval-mode model: the decoder then runs whole (its bands write
    # the logits in place, which autograd refuses) and gives the banded logits.
    dec = random_weights_(S.AdditiveMLPDecoder([8, 16, 24, 32], 12, 5, batch_norm=True), seed=5).eval().fuse()
    dec.row_band = 8
    gen = torch.Generator().manual_seed(6)
    feats = [torch.randn(1, c, h, h, generator=gen) for c, h in zip([8, 16, 24, 32], (40, 20, 10, 5))]
    with torch.no_grad():
        banded = dec(feats)
    feats[0].requires_grad_(True)
    out = dec(feats)
    out.square().sum().backward()
    assert (out - banded).abs().max().item() <= 1e-6
    assert feats[0].grad is not None and feats[0].grad.abs().sum() > 0


def test_mit_classifier_pools_the_normed_last_stage():
    torch.manual_seed(0)
    mit = random_weights_(S.mit_b0(num_classes=10), seed=4).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        last = mit.encoder.stages[3]
        y = x
        for stage in mit.encoder.stages[:3]:
            y = stage(y)
        tokens, hw = last.patch_embed(y)
        for block in last.blocks:
            tokens = block(tokens, hw)
        expected = mit.head(last.norm(tokens).mean(dim=1))
        out = mit(x)
        assert out.shape == (2, 10)
        assert torch.allclose(out, expected, atol=1e-5)
        assert (mit.fuse()(x) - out).abs().max().item() <= 1e-5


def test_mixffn_gelu_in_place_only_at_inference():
    act = S.MixFFN(8, 16).act
    x = torch.randn(2, 5, 16)
    want = nn.functional.gelu(x)
    with torch.no_grad():
        y = act(x.clone())
        fresh = x.clone()
        assert act(fresh).data_ptr() == fresh.data_ptr()  # in place: no second map allocated
    assert torch.equal(y, want)
    leaf = x.clone().requires_grad_()
    out = act(leaf)  # autograd records: out of place, so backward has its input
    out.sum().backward()
    assert out.data_ptr() != leaf.data_ptr() and torch.equal(leaf.detach(), x) and torch.equal(out.detach(), want)
    assert leaf.grad is not None


def test_block_inference_adds_residuals_in_place_of_branch_outputs_only():
    """Without autograd a block adds each residual into its branch's fresh output: the same sums bit for bit, the
    block's input untouched; with autograd (training) the plain out-of-place form runs and gradients flow."""
    torch.manual_seed(0)
    block = S.Block(32, 1, sr_ratio=2).eval()
    x, hw = torch.randn(2, 48, 32), (6, 8)
    kept = x.clone()
    with torch.no_grad():
        fast = block(x, hw)
    assert torch.equal(x, kept)
    y = x.clone().requires_grad_(True)
    slow = block(y, hw)
    assert torch.equal(fast, slow.detach())
    slow.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
