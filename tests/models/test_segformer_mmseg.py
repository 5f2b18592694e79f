"""SegFormer in open-mmlab mmsegmentation's own layout: key mapping, parity with what mmseg computes, the mmseg
decoder's fused form, and the places its decode head cannot go.

No mmseg outputs are stored here, so the parity reference is a plain-torch model built like mmseg's module tree
(``MixVisionTransformer`` of ``mmseg/models/backbones/mit.py``, ``SegformerHead``): its module and parameter names
are mmseg's, so its ``state_dict()`` under ``backbone.`` / ``decode_head.`` *is* an mmseg-layout checkpoint.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgeseg
from edgeseg.cli import main
from edgeseg.deploy.benchmark import count_gmacs
from edgeseg.models import segformer as S
from edgeseg.models.dynasegformer import from_segformer

B0_DIMS, HEADS, SR_RATIOS = (32, 64, 160, 256), (1, 2, 5, 8), (8, 4, 2, 1)
DEPTHS = (1, 2, 1, 1)  # B0-shaped, reduced depth; stage 2 keeps two blocks
DECODER_DIM, CLASSES = 48, 7
INPUT = (64, 96)  # 1/4 map 16 × 24: with row_band 8 the fused decoder runs in bands


# --------------------------------------------------------------------------------------------------------------
# The reference: mmseg's module tree in plain torch (names reproduce mmseg's keys)
# --------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, cin: int, dim: int, k: int, stride: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(cin, dim, k, stride, padding=k // 2)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.projection(x)
        return self.norm(x.flatten(2).transpose(1, 2)), x.shape[2:]


class EfficientMultiheadAttention(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads)  # sequence-first, as mmcv calls it
        self.sr_ratio = sr
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, hw):
        x_kv = x
        if self.sr_ratio > 1:
            x_kv = self.sr(x.transpose(1, 2).reshape(x.shape[0], -1, *hw))
            x_kv = self.norm(x_kv.flatten(2).transpose(1, 2))
        q, kv = x.transpose(0, 1), x_kv.transpose(0, 1)
        return self.attn(q, kv, kv, need_weights=False)[0].transpose(0, 1)


class MixFFN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = 4 * dim
        self.layers = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden),
                                    nn.GELU(), nn.Dropout(0.0), nn.Conv2d(hidden, dim, 1), nn.Dropout(0.0))

    def forward(self, x, hw):
        return self.layers(x.transpose(1, 2).reshape(x.shape[0], -1, *hw)).flatten(2).transpose(1, 2)


class TransformerEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientMultiheadAttention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = MixFFN(dim)

    def forward(self, x, hw):
        x = x + self.attn(self.norm1(x), hw)
        return x + self.ffn(self.norm2(x), hw)


class MixVisionTransformer(nn.Module):
    def __init__(self, dims=B0_DIMS, depths=DEPTHS) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        cin = 3
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            k, stride = (7, 4) if i == 0 else (3, 2)
            blocks = nn.ModuleList(TransformerEncoderLayer(dim, HEADS[i], SR_RATIOS[i]) for _ in range(depth))
            self.layers.append(nn.ModuleList([PatchEmbed(cin, dim, k, stride), blocks, nn.LayerNorm(dim, eps=1e-6)]))
            cin = dim

    def forward(self, x):
        outs = []
        for embed, blocks, norm in self.layers:
            x, hw = embed(x)
            for block in blocks:
                x = block(x, hw)
            x = norm(x).transpose(1, 2).reshape(x.shape[0], -1, *hw)
            outs.append(x)
        return outs


class ConvModule(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class SegformerHead(nn.Module):
    def __init__(self, in_channels=B0_DIMS, channels=DECODER_DIM, num_classes=CLASSES) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(0.1)
        self.convs = nn.ModuleList(ConvModule(c, channels) for c in in_channels)
        self.fusion_conv = ConvModule(channels * len(in_channels), channels)

    def forward(self, inputs):
        size = inputs[0].shape[2:]
        outs = [F.interpolate(conv(x), size=size, mode="bilinear", align_corners=False)
                for conv, x in zip(self.convs, inputs)]
        return self.conv_seg(self.dropout(self.fusion_conv(torch.cat(outs, dim=1))))


class EncoderDecoder(nn.Module):
    def __init__(self, dims=B0_DIMS, depths=DEPTHS) -> None:
        super().__init__()
        self.backbone = MixVisionTransformer(dims, depths)
        self.decode_head = SegformerHead(in_channels=dims)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


@torch.no_grad()
def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere, BN running stats included. The patch-embed and sequence-reduction convs are
    made small, so their LayerNorms see inputs of variance ~1e-4 and eps 1e-5 vs 1e-6 changes the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if name.endswith("running_var") or (name.endswith("weight") and t.ndim == 1):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif t.ndim >= 2:
            t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        if ".projection." in name or ".attn.sr." in name:
            t.mul_(1e-2)
    return model


def _mmseg_state_dict(model: EncoderDecoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mmseg_run(tmp_path_factory):
    """An mmseg-layout checkpoint file, the reference's logits and features, and what load_model made of it."""
    ref = _randomize(EncoderDecoder()).eval()
    path = tmp_path_factory.mktemp("mmseg") / "segformer_mit-b0_512x512_160k_ade20k.pth"
    torch.save({"meta": {}, "state_dict": _mmseg_state_dict(ref)}, path)
    x = torch.randn(2, 3, *INPUT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features, logits = ref.backbone(x), ref(x)
    return dict(path=path, ref=ref, x=x, features=features, logits=logits, model=edgeseg.load_model(path))


def test_load_model_builds_the_mmseg_architecture(mmseg_run):
    model = mmseg_run["model"]
    assert model.model_name == "segformer-b0"
    assert model.model_args == {"num_classes": CLASSES, "decoder_dim": DECODER_DIM, "depths": list(DEPTHS),
                                "decoder": "mmseg", "embed_ln_eps": 1e-6}
    assert isinstance(model.decode_head, S.MMSegMLPDecoder)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    sr_norms = sum(d for d, r in zip(DEPTHS, SR_RATIOS) if r > 1)
    assert len(norms) == 4 * 2 + 2 * sum(DEPTHS) + sr_norms  # patch-embed and stage, block, sequence reduction
    assert all(m.eps == 1e-6 for m in norms)


def test_logits_match_mmseg(mmseg_run):
    with torch.no_grad():
        features = mmseg_run["model"].forward_features(mmseg_run["x"])
        logits = mmseg_run["model"](mmseg_run["x"])
    for ours, ref in zip(features, mmseg_run["features"]):
        assert (ours - ref).abs().max().item() <= 1e-5
    assert logits.shape == mmseg_run["logits"].shape == (2, CLASSES, 16, 24)
    assert (logits - mmseg_run["logits"]).abs().max().item() <= 1e-5


def test_fused_form_is_exact_in_row_bands_and_whole(mmseg_run):
    model = mmseg_run["model"]
    fused = model.fuse()
    head = fused.decode_head
    assert isinstance(head, S.AdditiveMLPDecoder) and not hasattr(head, "linear_fuse")
    assert all(isinstance(b, nn.Sequential) and b[2].in_features == DECODER_DIM for b in head.linear_c)
    banded = []
    head._forward_in_bands = lambda f: banded.append(1) or S.AdditiveMLPDecoder._forward_in_bands(head, f)
    with torch.no_grad():
        head.row_band = 8
        in_bands = fused(mmseg_run["x"])
        head.row_band = 0
        whole = fused(mmseg_run["x"])
    assert banded == [1]  # the first pass ran in bands, the second whole
    assert (in_bands - whole).abs().max().item() <= 1e-6
    assert (in_bands - mmseg_run["logits"]).abs().max().item() <= 1e-5
    assert (whole - mmseg_run["logits"]).abs().max().item() <= 1e-5
    assert isinstance(model.decode_head, S.MMSegMLPDecoder)  # fuse() leaves the original untouched


def test_edgeseg_convert_round_trips_decoder_and_eps(mmseg_run, tmp_path):
    out = tmp_path / "b0.pth"
    assert main(["convert", str(mmseg_run["path"]), str(out)]) == 0
    again = edgeseg.load_model(out)
    assert again.model_args == mmseg_run["model"].model_args
    with torch.no_grad():
        assert torch.equal(again(mmseg_run["x"]), mmseg_run["model"](mmseg_run["x"]))


def test_load_checkpoint_into_an_official_decoder_points_to_load_model(mmseg_run):
    path = mmseg_run["path"]
    model = edgeseg.create_model("segformer-b0", num_classes=CLASSES, decoder_dim=DECODER_DIM, depths=list(DEPTHS))
    with pytest.raises(ValueError) as err:
        edgeseg.load_checkpoint(model, path)
    msg = str(err.value)
    assert "'decoder': 'mmseg'" in msg and f"load_model('{path}')" in msg and "\n" not in msg
    report = edgeseg.load_checkpoint(edgeseg.create_model("segformer-b0", num_classes=CLASSES, decoder="mmseg",
                                                          decoder_dim=DECODER_DIM, depths=list(DEPTHS)), path)
    assert any("embed_ln_eps=1e-6" in n for n in report.layout_notes)
    assert any("SegformerHead" in n for n in report.layout_notes)


# --------------------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------------------


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_b2_keys_and_shapes_map_onto_ours():
    """mmseg's B2 config: MiT-B2 widths and depths, decode head 256 wide (``channels=256`` for every variant)."""
    with torch.device("meta"):
        mmseg = _mmseg_state_dict(EncoderDecoder(dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)))
    converted, notes = S.convert_state_dict(mmseg)
    assert any("mmsegmentation layout" in n for n in notes) and not any("dropped" in n for n in notes)
    name, args = S.infer_model(converted)
    assert (name, args) == ("segformer-b2", {"num_classes": CLASSES, "decoder_dim": DECODER_DIM, "decoder": "mmseg"})
    with torch.device("meta"):
        ours = S.MODELS[name](**args, embed_ln_eps=1e-6)
    assert _shapes(converted) == _shapes(ours.state_dict())
    # every key maps; only in_proj_weight/bias split in two (q and kv), once per block
    assert len(converted) == len(mmseg) + 2 * (3 + 4 + 6 + 3)
    assert converted["decode_head.linear_pred.weight"].shape == (CLASSES, DECODER_DIM, 1, 1)  # conv_seg: the classifier
    assert S.layout_args(mmseg) == {"embed_ln_eps": 1e-6} and S.layout_args(converted) == {}


def test_backbone_only_file_into_mit_and_segformer_encoder(mmseg_run, tmp_path):
    """mit2mmseg.py writes the converted ImageNet backbone bare: mmseg's backbone keys without ``backbone.``."""
    ref = mmseg_run["ref"]
    path = tmp_path / "mit_b0.pth"
    torch.save(_mmseg_state_dict(ref.backbone), path)

    mit = edgeseg.load_model(path)
    assert mit.model_name == "mit-b0"
    assert mit.model_args == {"num_classes": 0, "depths": list(DEPTHS), "embed_ln_eps": 1e-6}
    seg = edgeseg.create_model("segformer-b0", num_classes=CLASSES, depths=list(DEPTHS), embed_ln_eps=1e-6).eval()
    report = edgeseg.load_checkpoint(seg, path)
    assert report.missing_keys and all(k.startswith("decode_head.") for k in report.missing_keys)
    assert not report.unexpected_keys and any("embed_ln_eps=1e-6" in n for n in report.layout_notes)
    with torch.no_grad():
        for model in (mit, seg):
            for ours, expected in zip(model.forward_features(mmseg_run["x"]), mmseg_run["features"]):
                assert (ours - expected).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------------------------------
# The decoder choice, its cost, and where an mmseg head cannot go
# --------------------------------------------------------------------------------------------------------------


def test_infer_model_rebuilds_the_decoder_choice():
    model = edgeseg.create_model("segformer-b0", decoder="mmseg", num_classes=19)
    assert model.model_args == {"num_classes": 19, "decoder": "mmseg"}
    name, args = S.infer_model(model.state_dict())
    assert (name, args) == ("segformer-b0", {"num_classes": 19, "decoder": "mmseg"})
    rebuilt = S.MODELS[name](**args)
    assert isinstance(rebuilt.decode_head, S.MMSegMLPDecoder)
    assert _shapes(rebuilt.state_dict()) == _shapes(model.state_dict())
    assert S.convert_state_dict(model.state_dict())[0].keys() == model.state_dict().keys()  # our own layout
    assert S.infer_model(edgeseg.create_model("segformer-b0").state_dict())[1] == {"num_classes": 150}
    with pytest.raises(ValueError, match="'official'.*'mmseg'"):
        edgeseg.create_model("segformer-b0", decoder="nvlabs")
    with pytest.raises(ValueError, match="decoder"):
        edgeseg.create_model("mit-b0", decoder="mmseg")


def test_gmacs_count_the_mmseg_decoder():
    """Same MACs as the official decoder (the same products); the paper's convention adds one charge per output of
    the four per-stage ReLUs. The fused form trades the 4E → E conv at 1/4 for an E → E Linear per stage."""
    H, W, E = 512, 512, 256
    with torch.device("meta"):
        official = edgeseg.create_model("segformer-b0").eval()
        mmseg = edgeseg.create_model("segformer-b0", decoder="mmseg").eval()
    assert count_gmacs(mmseg, (H, W), convention="macs") == count_gmacs(official, (H, W), convention="macs")
    relu_outputs = sum((H // 4 >> i) * (W // 4 >> i) * E for i in range(4))
    extra = count_gmacs(mmseg, (H, W)) - count_gmacs(official, (H, W))
    assert extra == pytest.approx(relu_outputs / 1e9, rel=1e-9)
    fused = edgeseg.create_model("segformer-b0", decoder="mmseg").fuse()
    saved = (H // 4) * (W // 4) * 4 * E * E - sum((H // 4 >> i) * (W // 4 >> i) * E * E for i in range(4))
    saved -= (H // 4) * (W // 4) * E * 2  # the classifier padded from 150 to 152 outputs (pad_output_channels)
    assert count_gmacs(mmseg, (H, W), convention="macs") - count_gmacs(fused, (H, W), convention="macs") == \
        pytest.approx(saved / 1e9, rel=1e-9)


def test_hf_export_refuses_the_mmseg_head_in_one_line(mmseg_run, tmp_path, capsys):
    dst = tmp_path / "hf"
    assert main(["convert", str(mmseg_run["path"]), str(dst), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "segformer-b0" in err and "decoder='mmseg'" in err and "--to edgeseg" in err
    assert not dst.exists()


def test_dynasegformer_refuses_an_mmseg_teacher_in_one_line(mmseg_run):
    with pytest.raises(ValueError) as err:
        from_segformer(mmseg_run["model"])
    msg = str(err.value)
    assert "segformer-b0" in msg and "decoder='mmseg'" in msg and "official decoder" in msg and "\n" not in msg


def test_dynasegformer_student_keeps_an_official_teachers_embed_ln_eps():
    from edgeseg.models.dynasegformer import from_segformer

    torch.manual_seed(0)
    teacher = edgeseg.create_model("segformer-b0", decoder="official", embed_ln_eps=1e-6, depths=[1, 1, 1, 1],
                           num_classes=5).eval()
    student = from_segformer(teacher, 0.0).eval()
    assert student.encoder.stages[0].patch_embed.norm.eps == 1e-6
    assert student.encoder.stages[0].blocks[0].attn.norm.eps == 1e-6
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (student(x) - teacher(x)).abs().max().item() <= 1e-5
