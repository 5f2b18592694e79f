"""TopFormer: Token Pyramid Vision Transformer for mobile semantic segmentation (Zhang et al., CVPR 2022).

Read top to bottom, in the paper's order:

1. ``TokenPyramid`` — a MobileNetV2 stack (stem + ``InvertedResidual`` blocks, plain ReLU) that taps tokens at
   1/4, 1/8, 1/16 and 1/32 of the input.
2. ``pool_tokens`` — every tapped scale is average-pooled to one small grid (1/64 of the input) and concatenated.
3. ``SemanticsExtractor`` — the Scale-aware Semantics Extractor: a few ``TransformerBlock`` (``Attention`` +
   ``MLP``, ReLU6) over those pooled tokens.
4. ``SemanticInjection`` — the extracted semantics are split back per scale and injected into the local tokens:
   ``local · h_sigmoid(global_act) + global_embedding`` (the official "muli_sum" injection).
5. ``TopFormerHead`` — sums the three injected maps at 1/8 and classifies each pixel.

``TopFormer`` chains them; ``TopFormerClassifier`` is the ImageNet form (no injection; pooled semantics → BN →
Linear). Then come the variant table, the official-checkpoint converter and the builders.

Last, beyond the paper: ``DynamicAttention`` / ``DynamicMLP`` put DynaSegFormer's Dynamic Gated Linear layers
(:mod:`.dynamic`) into the extractor — ``create_model("topformer-tiny", dynamic=True, sparsity=0.3)`` — and
``from_topformer`` builds that student from a dense teacher.

Everything here computes exactly what hustvl/TopFormer computes (mmseg ``Topformer`` backbone + ``SimpleHead``),
including its quirks, which are marked where they live, so official checkpoints give the paper's numbers.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .native import NativePlan, Part, Selection
from .dynamic import (
    DynamicGate,
    FoldedGate,
    consume_gathered,
    fold_gates,
    gather_columns,
    gather_hidden,
    gather_rows,
    gathered_hidden,
    gathered_linear,
    load_dense,
    native_hidden_plan,
    scatter_mask,
    top_r,
)
from .layers import (ConvBN, DropPath, HSigmoid, bn_affine, check_overrides, folded_bn_params, fuse_modules,
                     resize, upsample_logits)

__all__ = [
    "MODELS",
    "PAPER",
    "VARIANTS",
    "TopFormer",
    "TopFormerClassifier",
    "convert_state_dict",
    "from_topformer",
    "infer_model",
    "upsample_logits",
]


# --------------------------------------------------------------------------------------------------------------
# 1. Token Pyramid Module
# --------------------------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand (absent when ``expand_ratio == 1``) → k×k depthwise → 1×1 linear projection.

    The residual is added when the block keeps both resolution and width. TopFormer uses plain ReLU here (ReLU6
    only appears in the transformer).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        if expand_ratio != 1:
            self.expand = ConvBN(in_channels, hidden, 1, act=nn.ReLU)
        self.depthwise = ConvBN(hidden, hidden, kernel_size, stride, groups=hidden, act=nn.ReLU)
        self.project = ConvBN(hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if hasattr(self, "expand") else x
        y = self.project(self.depthwise(y))
        return x + y if self.use_residual else y


class TokenPyramid(nn.Module):
    """Stem (3×3 conv, stride 2) + inverted residuals; returns the tokens after the blocks listed in ``taps``.

    ``cfgs`` rows are ``(kernel, expand_ratio, out_channels, stride)`` as in the official configs. (The official
    code also rounds widths with ``_make_divisible(c, 8)``; every released width is a multiple of 8, so that is
    the identity and is left out.)

    Input (B, 3, H, W) → list of (B, C_i, H_i, W_i), one per tap, with H_i = ⌈H / stride_i⌉.
    """

    def __init__(self, cfgs: Sequence[Sequence[int]], taps: Sequence[int], stem_channels: int = 16) -> None:
        super().__init__()
        self.taps = tuple(taps)
        self.stem = ConvBN(3, stem_channels, 3, stride=2, act=nn.ReLU)
        blocks = []
        in_channels = stem_channels
        for kernel, expand_ratio, out_channels, stride in cfgs:
            blocks.append(InvertedResidual(in_channels, out_channels, kernel, stride, expand_ratio))
            in_channels = out_channels
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        tokens = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.taps:
                tokens.append(x)
        return tokens


def pool_tokens(tokens: Sequence[torch.Tensor], stride: int = 2) -> torch.Tensor:
    """Average-pool every scale to the grid of the coarsest tap divided by ``stride``, then concatenate channels.

    The grid is ``(h - 1) // stride + 1`` of the last (1/32) tap, i.e. ⌈H/64⌉ × ⌈W/64⌉ of the input for the
    segmentation models (stride 2), and the pooling is adaptive (official ``PyramidPoolAgg``), so any input size
    works. Returns (B, ΣC_i, h', w').
    """
    h, w = tokens[-1].shape[-2:]
    size = ((h - 1) // stride + 1, (w - 1) // stride + 1)
    return torch.cat([F.adaptive_avg_pool2d(t, size) for t in tokens], dim=1)


# --------------------------------------------------------------------------------------------------------------
# 2. Scale-aware Semantics Extractor
# --------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention on a (B, C, h, w) token map, with 1×1 conv + BN projections (LeViT style).

    Official quirk kept for checkpoint parity: the official code computes ``scale = key_dim ** -0.5`` and never
    applies it, so the logits ``q·k`` are *not* divided by √d. ``self.scale`` is kept only to document that.
    The output projection is ReLU6 then conv + BN.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = int(attn_ratio * key_dim)
        self.scale = key_dim**-0.5  # computed, never applied (see class docstring)
        self.to_q = ConvBN(dim, key_dim * num_heads, 1)
        self.to_k = ConvBN(dim, key_dim * num_heads, 1)
        self.to_v = ConvBN(dim, self.value_dim * num_heads, 1)
        self.act = nn.ReLU6()
        self.proj = ConvBN(self.value_dim * num_heads, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q = self.to_q(x).reshape(b, self.num_heads, self.key_dim, h * w).transpose(2, 3)  # (B, heads, N, d_k)
        k = self.to_k(x).reshape(b, self.num_heads, self.key_dim, h * w)  # (B, heads, d_k, N)
        v = self.to_v(x).reshape(b, self.num_heads, self.value_dim, h * w).transpose(2, 3)  # (B, heads, N, d_v)
        out = self.attend(q, k, v).transpose(2, 3).reshape(b, self.num_heads * self.value_dim, h, w)
        return self.proj(self.act(out))

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``softmax(q k) v`` per head — q (B, heads, N, d), k (B, heads, d, N), v (B, heads, N, d_v); unscaled."""
        return torch.matmul(torch.matmul(q, k).softmax(dim=-1), v)


class MLP(nn.Module):
    """Feed-forward: 1×1 conv + BN → 3×3 depthwise conv (with bias) → ReLU6 → 1×1 conv + BN."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = ConvBN(dim, hidden_dim, 1)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, groups=hidden_dim, bias=True)
        self.act = nn.ReLU6()
        self.fc2 = ConvBN(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class TransformerBlock(nn.Module):
    """``x + attn(x)`` then ``x + mlp(x)``, each branch with stochastic depth; no norm layers (BN sits in convs)."""

    def __init__(
        self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, mlp_ratio: float, drop_path: float
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, key_dim, num_heads, attn_ratio)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


class SemanticsExtractor(nn.Module):
    """The Scale-aware Semantics Extractor: ``depth`` transformer blocks over the pooled token pyramid.

    Stochastic-depth rates grow linearly from 0 to ``drop_path_rate`` over the blocks (official ``linspace``).
    (B, C, h, w) → (B, C, h, w) with C = ΣC_i of the tapped scales.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        mlp_ratio: float,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, key_dim, num_heads, attn_ratio, mlp_ratio, rate) for rate in rates
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


# --------------------------------------------------------------------------------------------------------------
# 3. Semantics Injection Module and the heads
# --------------------------------------------------------------------------------------------------------------


class SemanticInjection(nn.Module):
    """Inject global semantics into local tokens: ``local_embedding(x_l) · ↑h_sigmoid(global_act(x_g)) +
    ↑global_embedding(x_g)`` (the official "muli_sum" injection; ↑ = bilinear, ``align_corners=False``).

    The two global branches run on the tiny 1/64 grid before upsampling, so they cost almost nothing.
    x_l (B, C_l, H, W), x_g (B, C_g, h, w) → (B, out_channels, H, W).
    """

    def __init__(self, local_channels: int, global_channels: int, out_channels: int) -> None:
        super().__init__()
        self.local_embedding = ConvBN(local_channels, out_channels, 1)
        self.global_act = ConvBN(global_channels, out_channels, 1)
        self.global_embedding = ConvBN(global_channels, out_channels, 1)
        self.gate = HSigmoid()

    def forward(self, x_local: torch.Tensor, x_global: torch.Tensor) -> torch.Tensor:
        size = x_local.shape[-2:]
        local = self.local_embedding(x_local)
        gate = resize(self.gate(self.global_act(x_global)), size)
        glob = resize(self.global_embedding(x_global), size)
        return local * gate + glob


class TopFormerHead(nn.Module):
    """The official ``SimpleHead``: sum the injected maps at the first one's size (1/8), then 1×1 conv (no bias)
    + BN + ReLU (``linear_fuse``; depthwise for Tiny on ADE20K/PASCAL Context/COCO-Stuff), Dropout2d, and a 1×1
    classifier ``conv_seg`` with bias.

    list of (B, C, H_i, W_i) → (B, num_classes, H_0, W_0).
    """

    def __init__(self, channels: int, num_classes: int, depthwise: bool = False, dropout_ratio: float = 0.1) -> None:
        super().__init__()
        self.linear_fuse = ConvBN(channels, channels, 1, groups=channels if depthwise else 1, act=nn.ReLU)
        self.dropout = nn.Dropout2d(dropout_ratio)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[0]
        for feature in features[1:]:
            x = x + resize(feature, x.shape[-2:])
        return self.conv_seg(self.dropout(self.linear_fuse(x)))


class ClassifierHead(nn.Module):
    """Global average pool → BatchNorm1d → Linear. (B, C, h, w) → (B, num_classes)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x.mean(dim=(2, 3))))

    def fuse(self) -> nn.Module:
        """Fold the BN into the Linear: ``W' = W·diag(γ/σ)``, ``b' = b + W·(β − μγ/σ)``."""
        scale, shift = bn_affine(self.bn)
        fc = nn.Linear(self.fc.in_features, self.fc.out_features).to(self.fc.weight)
        with torch.no_grad():
            fc.weight.copy_(self.fc.weight * scale)
            fc.bias.copy_(self.fc.bias + self.fc.weight @ shift)
        self.bn, self.fc = nn.Identity(), fc
        return self


# --------------------------------------------------------------------------------------------------------------
# 4. The models
# --------------------------------------------------------------------------------------------------------------


def init_weights(model: nn.Module) -> None:
    """Training-from-scratch init as the official code gives it: the backbone's own rule, conv ~ N(0, 2/(k²·C_out/
    groups)), BN = (1, 0), Linear ~ N(0, 0.01²); the decode head's ConvModule mmcv's ``kaiming_init`` (fan-out
    k²·C_out, groups not divided out: std 0.125, not √2, for Tiny's depthwise fuse conv); its classifier
    ``conv_seg`` ~ N(0, 0.01²) as mmseg's decode heads."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if name.endswith("conv_seg"):
                nn.init.normal_(m.weight, 0, 0.01)
            elif name.startswith("head."):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _fused_copy(model: nn.Module, pad_multiple: int = 8) -> nn.Module:
    """Deep-copy, fold every block (``fuse_modules``: each block that knows how folds itself), and run the
    result channels-last. Dynamic extractor blocks first freeze their gates on the unfolded weights they were
    trained with (:func:`~edgeseg.models.dynamic.fold_gates`, ``pad_multiple``).

    Channels-last lets oneDNN run the depthwise and 1×1 convs without layout reorders (about 2× faster on CPU
    here); inputs in either memory format work and give the same numbers, and the logits come out channels-last.
    Every activation in this network reads a fresh conv/matmul output that nothing else holds, so after folding
    the activations can run in place.
    """
    fused = fuse_modules(fold_gates(copy.deepcopy(model).eval(), pad_multiple))
    for module in fused.modules():
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            module.inplace = True
    return fused.to(memory_format=torch.channels_last)


class TopFormer(nn.Module):
    """TokenPyramid → pool → SemanticsExtractor → SemanticInjection (scales 1..3) → TopFormerHead.

    ``forward`` takes (B, 3, H, W) normalised images and returns logits at 1/8: (B, num_classes, ⌈H/8⌉, ⌈W/8⌉).
    Upsample them with ``upsample_logits`` for per-pixel labels.
    """

    def __init__(
        self,
        pyramid_cfgs: Sequence[Sequence[int]],
        pyramid_taps: Sequence[int],
        channels: Sequence[int],
        num_heads: int,
        head_channels: int,
        head_depthwise: bool,
        num_classes: int = 150,
        depth: int = 4,
        key_dim: int = 16,
        attn_ratio: float = 2,
        mlp_ratio: float = 2,
        pool_stride: int = 2,
        drop_path_rate: float = 0.1,
        dropout_ratio: float = 0.1,
        dynamic: bool = False,
        sparsity: float = 0.3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.channels = tuple(channels)
        self.pool_stride = pool_stride
        self.token_pyramid = TokenPyramid(pyramid_cfgs, pyramid_taps)
        self.extractor = SemanticsExtractor(
            sum(channels), depth, key_dim, num_heads, attn_ratio, mlp_ratio, drop_path_rate
        )
        # Injection into the 1/8, 1/16 and 1/32 tokens (official decode_out_indices = [1, 2, 3]); the 1/4
        # tokens only feed the extractor.
        self.injection = nn.ModuleList(SemanticInjection(c, c, head_channels) for c in self.channels[1:])
        self.head = TopFormerHead(head_channels, num_classes, head_depthwise, dropout_ratio)
        self.model_name = "topformer"
        self.model_args: dict = {"num_classes": num_classes}
        init_weights(self)
        if dynamic:  # after init: a fresh gate must output G ≡ 1 (the dense model at sparsity 0)
            make_dynamic_extractor(self.extractor, sparsity)

    def forward_features(
        self, x: torch.Tensor, return_pyramid: bool = False
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B, 3, H, W) → the injected maps at 1/8, 1/16, 1/32, each (B, head_channels, ⌈H/s⌉, ⌈W/s⌉).

        With ``return_pyramid=True`` also returns the raw token pyramid (1/4 … 1/32) as a second list.
        """
        tokens = self.token_pyramid(x)
        semantics = self.extractor(pool_tokens(tokens, self.pool_stride)).split(self.channels, dim=1)
        injected = [sim(t, s) for sim, t, s in zip(self.injection, tokens[1:], semantics[1:])]
        return (injected, tokens) if return_pyramid else injected

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def fuse(self, pad_multiple: int = 8) -> TopFormer:
        """A new inference model: BN folded into every conv, dropout/drop-path removed, channels-last weights;
        a dynamic extractor runs its gathered form with folded gates, widths padded to ``pad_multiple``."""
        return _fused_copy(self, pad_multiple)


class TopFormerClassifier(nn.Module):
    """The ImageNet form (official backbone with ``injection=False``): TokenPyramid → pool → SemanticsExtractor →
    global average → BatchNorm1d → Linear (keys ``head.bn``/``head.l`` in the official ImageNet files).

    The official repo ships no classification code; the head follows the checkpoint keys (LeViT's ``BN_Linear``)
    and the PaddleViT port that was checked numerically against these files: it pools the extractor output, and
    its ImageNet configs pool the pyramid with stride 1 (tokens at 1/32, 7×7 at 224²; segmentation uses 2), which
    is also what brings the counts to the published 0.13 / 0.24 / 0.37 GFLOPs (between our MACs-only and mmcv-
    convention counts: 0.120–0.129, 0.228–0.238, 0.364–0.377). (B, 3, H, W) → (B, num_classes).
    """

    def __init__(
        self,
        pyramid_cfgs: Sequence[Sequence[int]],
        pyramid_taps: Sequence[int],
        channels: Sequence[int],
        num_heads: int,
        num_classes: int = 1000,
        depth: int = 4,
        key_dim: int = 16,
        attn_ratio: float = 2,
        mlp_ratio: float = 2,
        pool_stride: int = 1,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.pool_stride = pool_stride
        self.token_pyramid = TokenPyramid(pyramid_cfgs, pyramid_taps)
        dim = sum(channels)
        self.extractor = SemanticsExtractor(dim, depth, key_dim, num_heads, attn_ratio, mlp_ratio, drop_path_rate)
        self.head = ClassifierHead(dim, num_classes)
        self.model_name = "topformer-cls"
        self.model_args: dict = {"num_classes": num_classes}
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) → the token pyramid (1/4 … 1/32), then the extracted semantics (B, ΣC, ⌈H/32⌉,
        ⌈W/32⌉) at the ImageNet pool stride 1, as the official backbone returns them with ``injection=False``."""
        tokens = self.token_pyramid(x)
        return [*tokens, self.extractor(pool_tokens(tokens, self.pool_stride))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[-1])

    def fuse(self) -> TopFormerClassifier:
        """A new inference model: BN folded into every conv and into the classifier, drop-path removed."""
        return _fused_copy(self)


# --------------------------------------------------------------------------------------------------------------
# 5. Variants (official local_configs/topformer/*.py)
# --------------------------------------------------------------------------------------------------------------

# Rows of (kernel, expand_ratio, out_channels, stride). Taps index the blocks whose outputs form the pyramid.
# The head sums the three injected maps, so the injection (SIM) width and the head width are one number,
# ``head_channels``. Per-dataset configs differ only in: num_classes (ADE20K 150, PASCAL Context 60/59,
# COCO-Stuff-10k 171, Cityscapes 19), ``head_channels=128`` for Base on Cityscapes, ``head_depthwise=False`` for
# Tiny on Cityscapes. Everything else (depth 4, key_dim 16, attn/mlp ratio 2, pool stride 2, drop path 0.1,
# dropout 0.1) is shared.
VARIANTS: dict[str, dict] = {
    "tiny": dict(
        pyramid_cfgs=(
            (3, 1, 16, 1),
            (3, 4, 16, 2),
            (3, 3, 16, 1),
            (5, 3, 32, 2),
            (5, 3, 32, 1),
            (3, 3, 64, 2),
            (3, 3, 64, 1),
            (5, 6, 96, 2),
            (5, 6, 96, 1),
        ),
        pyramid_taps=(2, 4, 6, 8),
        channels=(16, 32, 64, 96),
        num_heads=4,
        head_channels=128,
        head_depthwise=True,
        drop_path_rate=0.1,
    ),
    "small": dict(
        pyramid_cfgs=(
            (3, 1, 16, 1),
            (3, 4, 24, 2),
            (3, 3, 24, 1),
            (5, 3, 48, 2),
            (5, 3, 48, 1),
            (3, 3, 96, 2),
            (3, 3, 96, 1),
            (5, 6, 128, 2),
            (5, 6, 128, 1),
            (3, 6, 128, 1),
        ),
        pyramid_taps=(2, 4, 6, 9),
        channels=(24, 48, 96, 128),
        num_heads=6,
        head_channels=192,
        head_depthwise=False,
        drop_path_rate=0.1,
    ),
    "base": dict(
        pyramid_cfgs=(
            (3, 1, 16, 1),
            (3, 4, 32, 2),
            (3, 3, 32, 1),
            (5, 3, 64, 2),
            (5, 3, 64, 1),
            (3, 3, 128, 2),
            (3, 3, 128, 1),
            (5, 6, 160, 2),
            (5, 6, 160, 1),
            (3, 6, 160, 1),
        ),
        pyramid_taps=(2, 4, 6, 9),
        channels=(32, 64, 128, 160),
        num_heads=8,
        head_channels=256,
        head_depthwise=False,
        drop_path_rate=0.1,
    ),
}

# Published figures: params (M) and GMACs ("FLOPs" in the paper, counted by mmcv) at the given input size; for
# segmentation the official README (ADE20K), for the ImageNet models the table published with the ported weights
# (PaddleViT, 224×224). The README also lists Tiny at 448×448 with 0.5 GFLOPs, which no count reproduces (0.44).
PAPER: dict[str, dict] = {
    "topformer-tiny": {"num_classes": 150, "params_m": 1.4, "gmacs": 0.6, "input_size": [512, 512]},
    "topformer-small": {"num_classes": 150, "params_m": 3.1, "gmacs": 1.2, "input_size": [512, 512]},
    "topformer-base": {"num_classes": 150, "params_m": 5.1, "gmacs": 1.8, "input_size": [512, 512]},
    "topformer-tiny-cls": {"num_classes": 1000, "params_m": 1.5, "gmacs": 0.13, "input_size": [224, 224]},
    "topformer-small-cls": {"num_classes": 1000, "params_m": 3.1, "gmacs": 0.24, "input_size": [224, 224]},
    "topformer-base-cls": {"num_classes": 1000, "params_m": 5.1, "gmacs": 0.37, "input_size": [224, 224]},
}
# The input size each model is counted at when none is asked for (``edgeseg info``): its published figure's.
INPUT_SIZES: dict[str, tuple[int, int]] = {name: tuple(fig["input_size"]) for name, fig in PAPER.items()}


# --------------------------------------------------------------------------------------------------------------
# 6. Official checkpoints → edgeseg layout
# --------------------------------------------------------------------------------------------------------------

# Ordered substring rules, official → edgeseg (applied after the prefixes and the token-pyramid rule below).
_RENAMES: tuple[tuple[str, str], ...] = (
    ("trans.transformer_blocks.", "extractor.blocks."),
    (".attn.proj.1.", ".attn.proj."),  # official proj = Sequential(ReLU6, Conv2d_BN); ours applies ReLU6 inline
    ("tpm.stem.0.", "token_pyramid.stem."),
    ("head.l.", "head.fc."),  # ImageNet BN_Linear
    (".c.", ".conv."),  # LeViT-style Conv2d_BN names its conv "c"
)
# Pre-release names, renamed as the official tools/convert_state_dict.py does.
_PRE_RELEASE: tuple[tuple[str, str], ...] = (
    ("patch_embed.", "tpm."),
    ("fuse_blocks.", "SIM."),
    (".to_feat1.", ".local_embedding."),
    (".to_feat2.", ".global_embedding."),
    (".fuse2.", ".global_act."),
)
_OFFICIAL_STEM = re.compile(r"^(backbone\.)?(tpm|patch_embed)\.stem\.0\.c\.weight$")
_PYRAMID_LAYER = re.compile(r"^tpm\.layer(\d+)\.conv\.(\d)\.")
_INJECTION = re.compile(r"^SIM\.(\d+)\.")


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """Map any TopFormer layout onto edgeseg's; ``None`` if the keys are not TopFormer's.

    Accepted: official mmseg checkpoints (``backbone.*``/``decode_head.*``), the official ImageNet files (bare
    backbone keys + ``head.bn``/``head.l``; returned with the classifier, which only a ``-cls`` model uses),
    pre-release names (``patch_embed``, ``fuse_blocks``, ``to_feat1/2``, ``fuse2``) and edgeseg's own layout
    (returned unchanged). Pure function: tensors are shared, not copied.
    """
    keys = list(state_dict)
    if any(k.startswith("token_pyramid.stem.") for k in keys):
        return dict(state_dict), ["edgeseg TopFormer layout"]
    if not any(_OFFICIAL_STEM.match(k) for k in keys):
        return None

    notes = []
    if any(k.startswith(("backbone.patch_embed.", "patch_embed.")) for k in keys):
        notes.append("renamed pre-release keys (patch_embed, fuse_blocks, to_feat1/2, fuse2) as official tools do")
    if any(k.startswith("backbone.") for k in keys):
        notes.append("official mmseg TopFormer checkpoint (backbone.*, decode_head.*)")
    if "head.l.weight" in state_dict:
        notes.append("official ImageNet TopFormer file: classifier head.bn/head.l kept (as head.bn/head.fc), "
                     "used only by a -cls model")

    def normalise(key: str) -> str:
        key = key.removeprefix("backbone.")
        if key.startswith("decode_head."):
            key = "head." + key.removeprefix("decode_head.")
        if key.startswith(("patch_embed.", "fuse_blocks.")):
            for old, new in _PRE_RELEASE:
                key = key.replace(old, new)
        return key

    official = {normalise(k): v for k, v in state_dict.items()}
    # The official InvertedResidual is a Sequential [expand, ReLU,] depthwise, ReLU, project: a block has an
    # expand conv exactly when it has a third conv (index 4).
    expanding = {m[1] for k in official if (m := _PYRAMID_LAYER.match(k)) and m[2] == "4"}

    def rename(key: str) -> str:
        if m := _PYRAMID_LAYER.match(key):
            roles = ("expand", "depthwise", "project") if m[1] in expanding else ("depthwise", "project")
            key = f"token_pyramid.layers.{int(m[1]) - 1}.{roles[int(m[2]) // 2]}." + key[m.end():]
        if m := _INJECTION.match(key):
            key = f"injection.{int(m[1]) - 1}." + key[m.end():]  # official SIM.0 is an Identity on the 1/4 map
        for old, new in _RENAMES:
            key = key.replace(old, new)
        return key

    converted = {rename(k): v for k, v in official.items()}
    return converted, notes


def infer_model(state_dict: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """From an edgeseg-layout state dict, the builder name and kwargs that rebuild exactly this architecture.

    The variant is recognised by the token-pyramid widths; num_classes, head width and depthwise-ness by the
    head's tensor shapes. Only kwargs that differ from the variant's defaults (plus num_classes) are returned.
    """
    widths = []
    while (w := state_dict.get(f"token_pyramid.layers.{len(widths)}.project.conv.weight")) is not None:
        widths.append(w.shape[0])
    variant = next(
        (name for name, cfg in VARIANTS.items() if widths == [row[2] for row in cfg["pyramid_cfgs"]]), None
    )
    if variant is None:
        raise ValueError(f"state dict is not a known TopFormer variant (token pyramid widths {widths})")
    if "head.fc.weight" in state_dict:
        return f"topformer-{variant}-cls", {"num_classes": state_dict["head.fc.weight"].shape[0]}
    if "head.linear_fuse.conv.weight" not in state_dict:
        raise ValueError(f"TopFormer-{variant} weights without a head (neither head.linear_fuse nor head.fc): a "
                         f"backbone starts a training run (model.pretrained), it cannot segment")
    fuse_weight = state_dict["head.linear_fuse.conv.weight"]
    args: dict = {"num_classes": state_dict["head.conv_seg.weight"].shape[0]}
    head_channels = fuse_weight.shape[0]
    head_depthwise = fuse_weight.shape[1] == 1 and head_channels > 1
    if head_channels != VARIANTS[variant]["head_channels"]:
        args["head_channels"] = head_channels
    if head_depthwise != VARIANTS[variant]["head_depthwise"]:
        args["head_depthwise"] = head_depthwise
    if any(".qk_gate." in k for k in state_dict):  # DGL extractor; its sparsity is in model_args, not the weights
        args["dynamic"] = True
    return f"topformer-{variant}", args


# --------------------------------------------------------------------------------------------------------------
# 7. Builders
# --------------------------------------------------------------------------------------------------------------

# Overrides: the per-dataset differences of the official configs, plus the regularisation rates.
_SEG_ARGS = ("head_channels", "head_depthwise", "drop_path_rate", "dropout_ratio", "dynamic", "sparsity")
_CLS_ARGS = ("drop_path_rate",)


def _create(variant: str, classifier: bool, num_classes: int, overrides: dict) -> nn.Module:
    allowed = _CLS_ARGS if classifier else _SEG_ARGS
    check_overrides(TopFormerClassifier if classifier else TopFormer, overrides, "TopFormer", allowed)
    if "sparsity" in overrides and not overrides.get("dynamic", True):
        raise ValueError("sparsity is set but dynamic=False: a dense TopFormer prunes nothing")
    if "sparsity" in overrides:  # a sparsity only means something for the dynamic extractor
        overrides = {"dynamic": True, **overrides}
    cfg = {**VARIANTS[variant], **overrides}
    if classifier:
        cfg = {k: v for k, v in cfg.items() if k not in ("head_channels", "head_depthwise")}
        model = TopFormerClassifier(num_classes=num_classes, **cfg)
    else:
        model = TopFormer(num_classes=num_classes, **cfg)
    model.model_name = f"topformer-{variant}" + ("-cls" if classifier else "")
    model.model_args = {"num_classes": num_classes, **overrides}
    return model


def topformer_tiny(num_classes: int = 150, **overrides: Any) -> TopFormer:
    """TopFormer-T (1.4 M params, 0.6 GMACs at 512²). Cityscapes config: ``head_depthwise=False``."""
    return _create("tiny", False, num_classes, overrides)


def topformer_small(num_classes: int = 150, **overrides: Any) -> TopFormer:
    """TopFormer-S (3.1 M params, 1.2 GMACs at 512²)."""
    return _create("small", False, num_classes, overrides)


def topformer_base(num_classes: int = 150, **overrides: Any) -> TopFormer:
    """TopFormer-B (5.1 M params, 1.8 GMACs at 512²). Cityscapes config: ``head_channels=128``."""
    return _create("base", False, num_classes, overrides)


def topformer_tiny_cls(num_classes: int = 1000, **overrides: Any) -> TopFormerClassifier:
    """TopFormer-T ImageNet classifier (official ``topformer-T-224-66.2.pth``)."""
    return _create("tiny", True, num_classes, overrides)


def topformer_small_cls(num_classes: int = 1000, **overrides: Any) -> TopFormerClassifier:
    """TopFormer-S ImageNet classifier (official ``topformer-S-224-72.3.pth``)."""
    return _create("small", True, num_classes, overrides)


def topformer_base_cls(num_classes: int = 1000, **overrides: Any) -> TopFormerClassifier:
    """TopFormer-B ImageNet classifier (official ``topformer-B-224-75.3.pth``)."""
    return _create("base", True, num_classes, overrides)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "topformer-tiny": topformer_tiny,
    "topformer-small": topformer_small,
    "topformer-base": topformer_base,
    "topformer-tiny-cls": topformer_tiny_cls,
    "topformer-small-cls": topformer_small_cls,
    "topformer-base-cls": topformer_base_cls,
}


# --------------------------------------------------------------------------------------------------------------
# 8. Beyond the paper: a dynamic semantics extractor (DynaSegFormer's DGL on TopFormer's 1×1 convs)
# --------------------------------------------------------------------------------------------------------------


def _gate_weight(module: nn.Module) -> torch.Tensor:
    """``W1`` a gate reads: the 1×1 conv weight (out, in, 1, 1) — of the ConvBN's conv, as the dense layer trains
    it (in a fused model the gates are folded and never read it)."""
    return (module.conv if isinstance(module, ConvBN) else module).weight


def _linear_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (out, in), b (out,)) of a 1×1 conv + BN in eval mode: the BN folded on the fly, or the fused conv's."""
    if isinstance(module, ConvBN):
        weight, bias = folded_bn_params(module.conv, module.bn)
        return weight.flatten(1), bias
    return module.weight.flatten(1), module.bias


class DynamicAttention(Attention):
    """TopFormer attention with DGL on Q/K and V, as DynaSegFormer gates SegFormer's attention.

    The 1×1 conv projections are linear layers over the tokens. One mask per head prunes the same channels from Q
    and K (``W1`` = rows of ``to_q`` and ``to_k``; the product ``q k`` consumes them); a second prunes V channels
    and the matching input columns of ``proj``. The gate values scale K and V (after their BN): a pruned V channel
    is 0, and ReLU6(0) = 0, so ``proj`` need not read it. Gates read the pooled block input.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, sparsity: float = 0.0) -> None:
        super().__init__(dim, key_dim, num_heads, attn_ratio)
        self.qk_gate = DynamicGate(dim, key_dim * num_heads, sparsity, num_heads, rows=(None, None))
        self.v_gate = DynamicGate(dim, self.value_dim * num_heads, sparsity, num_heads)
        self.joint_gate: FoldedGate | None = None
        # [W_q; W_k; W_v] and biases with BN folded, stacked once by fold_gates (inference only)
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    @classmethod
    def from_dense(cls, attn: Attention, sparsity: float = 0.0) -> DynamicAttention:
        """The same attention (weights copied) with new gates."""
        new = cls(attn.to_q.conv.in_channels, attn.key_dim, attn.num_heads, attn.value_dim / attn.key_dim, sparsity)
        load_dense(new, attn, "a dynamic extractor attention")
        return new.to(attn.to_q.conv.weight.device)

    def fold_gates(self) -> None:
        """Freeze both gates for inference and join them into one (they read the same pool)."""
        self.qk_gate.fold(_gate_weight(self.to_q), _gate_weight(self.to_k))
        self.v_gate.fold(_gate_weight(self.to_v), consumer=_linear_params(self.proj)[0])
        self.joint_gate = FoldedGate.stack([self.qk_gate.folded, self.v_gate.folded])
        with torch.no_grad():
            self.qkv_weight, self.qkv_bias = self._qkv_params()

    def _qkv_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        params = [_linear_params(m) for m in (self.to_q, self.to_k, self.to_v)]
        return torch.cat([w for w, _ in params]), torch.cat([b for _, b in params])

    def native_plan(self) -> NativePlan | None:
        """:meth:`plan` as one native call (:mod:`.native`), cached on the Q/K gate by the kept and padded
        widths; None before :meth:`fold_gates` or without a built kernel."""
        qk, v = self.qk_gate, self.v_gate
        if self.joint_gate is None:
            return None

        def build() -> NativePlan:  # slots [Q/K | V]; gate logits [Q/K (nk) | V]; qkv rows [Q | K | V]
            nk, heads = qk.gated_features, self.num_heads
            sq, sv = heads * qk.width, heads * v.width
            selections = [Selection(0, heads, self.key_dim, qk.keep, qk.width),
                          Selection(nk, heads, self.value_dim, v.keep, v.width)]
            stacked = [[Part(t, 0, sq), Part(t, 0, sq, offset=-nk, scale="value"),
                        Part(t, sq, sv, offset=-nk, scale="value")] for t in (self.qkv_weight, self.qkv_bias)]
            return NativePlan(self.joint_gate, selections, [*stacked, [Part(v.consumer_t, sq, sv, offset=nk)]],
                              _qkv_views)

        return qk.native_plan((qk.keep, qk.width, v.keep, v.width), build)

    def plan(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gates and gathers of the inference form: the kept rows of Q, K (scaled) and V (scaled) as one weight,
        so the three projections run as one product, and the kept columns of ``proj``; natively where it can
        (:meth:`native_plan`)."""
        qk_gate, v_gate = self.qk_gate, self.v_gate
        if qk_gate.native and native.usable(x):
            planned = qk_gate.recent_plan(qk_gate.plan_state + v_gate.plan_state, self.native_plan)
            if planned is not None:
                return planned(x, (2, 3))[0]
        pooled = x.mean(dim=(2, 3))
        nk = qk_gate.gated_features
        if self.joint_gate is not None:  # heads are key_dim wide for Q/K, value_dim for V: two Top-r calls
            g_qk, g_v = self.joint_gate(pooled).split([nk, v_gate.gated_features], dim=1)
            qk_values, qk_index = top_r(g_qk, qk_gate.keep, self.num_heads, qk_gate.width)
            v_values, v_index = top_r(g_v, v_gate.keep, self.num_heads, v_gate.width)
        else:
            qk_values, qk_index = qk_gate(pooled, _gate_weight(self.to_q), _gate_weight(self.to_k))
            v_values, v_index = v_gate(pooled, _gate_weight(self.to_v))
        weight, bias = (self.qkv_weight, self.qkv_bias) if self.qkv_weight is not None else self._qkv_params()
        index = torch.cat([qk_index, qk_index + nk, v_index + 2 * nk], dim=1)
        values = torch.cat([torch.ones_like(qk_values), qk_values, v_values], dim=1)
        w_qkv, b_qkv = gather_rows(weight, bias, index, values)
        return w_qkv, b_qkv, gather_columns(v_gate.consumer_weight(_linear_params(self.proj)[0]), v_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads = self.num_heads
        if self.qk_gate.gathered:
            w_qkv, b_qkv, w_proj = self.plan(x)
            width_qk, width_v = self.qk_gate.width, self.v_gate.width
            tokens = x.flatten(2).transpose(1, 2)  # (B, N, C): a view of a channels-last map
            q, k, v = gathered_linear(tokens, w_qkv, b_qkv).split([heads * width_qk, heads * width_qk, heads * width_v],
                                                                  dim=-1)
            q = q.reshape(b, h * w, heads, width_qk).transpose(1, 2)
            k = k.reshape(b, h * w, heads, width_qk).permute(0, 2, 3, 1)
            v = v.reshape(b, h * w, heads, width_v).transpose(1, 2)
            out = self.attend(q, k, v).transpose(1, 2).reshape(b, h * w, heads * width_v)
            out = consume_gathered(self.act(out), w_proj, _linear_params(self.proj)[1])
            return out.transpose(1, 2).reshape(b, c, h, w)
        pooled = x.mean(dim=(2, 3))
        qk_values, qk_index = self.qk_gate(pooled, _gate_weight(self.to_q), _gate_weight(self.to_k))
        v_values, v_index = self.v_gate(pooled, _gate_weight(self.to_v))
        m_qk, _ = scatter_mask(qk_values, qk_index, self.qk_gate.gated_features)
        m_v, _ = scatter_mask(v_values, v_index, self.v_gate.gated_features)
        q = self.to_q(x).reshape(b, heads, self.key_dim, h * w).transpose(2, 3)
        k = (self.to_k(x) * m_qk[:, :, None, None]).reshape(b, heads, self.key_dim, h * w)
        v = (self.to_v(x) * m_v[:, :, None, None]).reshape(b, heads, self.value_dim, h * w).transpose(2, 3)
        out = self.attend(q, k, v).transpose(2, 3).reshape(b, heads * self.value_dim, h, w)
        return self.proj(self.act(out))


def _qkv_views(bufs: list[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """The native buffers as :meth:`DynamicAttention.plan` returns its plan."""
    w_qkv, b_qkv, w_proj_t = (b.flatten(0, 1) for b in bufs)
    return w_qkv, b_qkv.view(-1), w_proj_t.t()


class DynamicMLP(MLP):
    """TopFormer's MLP with a DGL on its hidden layer: ``fc2(ReLU6(DWConv(fc1(x) · M)) · supp(M))`` — the
    Mix-FFN scheme (:func:`~edgeseg.models.dynamic.gather_hidden`) on 1×1 conv + BN layers."""

    def __init__(self, dim: int, hidden_dim: int, sparsity: float = 0.0) -> None:
        super().__init__(dim, hidden_dim)
        self.gate = DynamicGate(dim, hidden_dim, sparsity)

    @classmethod
    def from_dense(cls, mlp: MLP, sparsity: float = 0.0) -> DynamicMLP:
        """The same MLP (weights copied) with a new gate."""
        new = cls(mlp.fc1.conv.in_channels, mlp.fc1.conv.out_channels, sparsity)
        load_dense(new, mlp, "a dynamic extractor MLP")
        return new.to(mlp.fc1.conv.weight.device)

    def fold_gates(self) -> None:
        """Freeze the gate for inference."""
        self.gate.fold(_gate_weight(self.fc1), consumer=_linear_params(self.fc2)[0])

    def plan(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Gate and gathers of the inference form (:func:`~edgeseg.models.dynamic.gather_hidden`), natively where
        it can (:func:`~edgeseg.models.dynamic.native_hidden_plan`)."""
        gate = self.gate
        if gate.native and native.usable(x):
            planned = gate.recent_plan(gate.plan_state, lambda: native_hidden_plan(
                gate, *_linear_params(self.fc1), self.dwconv.weight, self.dwconv.bias, _linear_params(self.fc2)[0]))
            if planned is not None:
                return planned(x, (2, 3))[0]
        (w1, b1), (w2, _) = _linear_params(self.fc1), _linear_params(self.fc2)
        values, index = self.gate(x.mean(dim=(2, 3)), _gate_weight(self.fc1))
        return gather_hidden(self.gate, values, index, w1, b1, self.dwconv.weight, self.dwconv.bias, w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.gate.gathered:
            tokens = x.flatten(2).transpose(1, 2)
            out = gathered_hidden(tokens, (h, w), self.plan(x), _linear_params(self.fc2)[1], self.act,
                                  self.dwconv.padding)
            return out.transpose(1, 2).reshape(b, c, h, w)
        values, index = self.gate(x.mean(dim=(2, 3)), _gate_weight(self.fc1))
        m, support = scatter_mask(values, index, self.gate.gated_features)
        y = self.dwconv(self.fc1(x) * m[:, :, None, None])
        return self.fc2(self.act(y) * support[:, :, None, None])


def make_dynamic_extractor(extractor: SemanticsExtractor, sparsity: float) -> SemanticsExtractor:
    """Swap, in place, every extractor block's attention and MLP for their DGL forms (weights kept, gates new)."""
    for block in extractor.blocks:
        block.attn = DynamicAttention.from_dense(block.attn, sparsity)
        block.mlp = DynamicMLP.from_dense(block.mlp, sparsity)
    return extractor


@torch.no_grad()
def from_topformer(teacher: TopFormer, sparsity: float = 0.3, **overrides: Any) -> TopFormer:
    """The distillation student of a dense TopFormer: the same variant with a dynamic extractor, holding the
    teacher's weights (gates new, ``G ≡ 1``: at sparsity 0 it computes the teacher's logits). ``overrides`` change
    training-only builder kwargs (e.g. ``drop_path_rate``)."""
    name = getattr(teacher, "model_name", "")
    if not name.startswith("topformer-") or name.endswith("-cls"):
        raise ValueError(f"a dynamic TopFormer's teacher must be a TopFormer segmentation model, got '{name}'")
    args = {k: v for k, v in teacher.model_args.items() if k not in ("dynamic", "sparsity")}
    student = MODELS[name](**{**args, **overrides, "dynamic": True, "sparsity": sparsity})
    load_dense(student, teacher, f"a dynamic {name}")
    return student.to(next(teacher.parameters())).train(teacher.training)  # device and dtype
