"""SegFormer (Xie et al., NeurIPS 2021): a Mix Transformer (MiT) encoder and an all-MLP decoder.

Read top to bottom as the paper tells it:

1. MiT encoder blocks — ``OverlapPatchEmbed`` (Sec. 3.1 "overlapped patch merging"), ``EfficientSelfAttention``
   (Eq. 2, key/value sequence reduced by ``sr_ratio``), ``MixFFN`` (Eq. 3, a 3×3 depthwise conv between the two
   linears gives positional information), ``Block`` (pre-norm transformer block), ``MiTStage``.
2. ``MixVisionTransformer``: four stages at 1/4, 1/8, 1/16, 1/32 (Fig. 2).
3. Decoders — ``MLPDecoder`` (Eq. 4: per-stage Linear to E, upsample to 1/4, concat, fuse, classify),
   ``MMSegMLPDecoder`` (the same decoder as mmsegmentation implements it: conv+BN+ReLU per stage, concatenation in
   input order) and their exact inference form ``AdditiveMLPDecoder`` (the fuse conv folded into the per-stage
   branches; see ``MLPDecoder.fuse`` and ``MMSegMLPDecoder.fuse``).
4. Models — ``SegFormer`` (logits at 1/4) and ``MiTClassifier`` (the ImageNet form of the encoder).
5. Variant table B0…B5 and the paper's figures.
6. Checkpoint layouts → edgeseg: official NVlabs mmseg, ImageNet ``mit_bX.pth``, Hugging Face (files and
   transformers-5 module names), open-mmlab mmsegmentation (model zoo, and ``mit_bX`` backbones converted by its
   ``mit2mmseg.py``); ``infer_model`` and ``layout_args`` (what a layout implies beyond the shapes).
7. Builders ``segformer-b0``…``segformer-b5`` and ``mit-b0``…``mit-b5``.

Parity: with the official checkpoint loaded unchanged, ``SegFormer`` computes what NVlabs/SegFormer computes
(``tests/models/test_segformer.py`` checks it against fixtures made by the official code); with an mmsegmentation
checkpoint, what mmsegmentation computes (``tests/models/test_segformer_mmseg.py``, against a plain-torch model
with mmseg's module tree).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .layers import (ConvBN, DropPath, InplaceGELU, bn_affine, channels_last_kernel_, check_overrides,
                     folded_bn_params, fuse_modules, pad_output_channels, resize)

# LayerNorm eps of the official code: ``partial(nn.LayerNorm, eps=1e-6)`` for the block norms (norm1/norm2) and
# the stage norms (norm1..4); PyTorch's default 1e-5 in the patch embeddings and the sequence-reduction norm.
# Hugging Face transformers builds every one of them with the default 1e-5 (its ``config.layer_norm_eps`` is not
# read by the SegFormer modules), so a model loaded from an HF folder is built with ``ln_eps=1e-5``.
# mmsegmentation's MiT passes its one ``norm_cfg`` (LN, eps 1e-6) to every LayerNorm, the patch embeddings and the
# sequence reduction included, so a model loaded from an mmseg file is built with ``embed_ln_eps=1e-6``.
OFFICIAL_LN_EPS = 1e-6
HF_LN_EPS = 1e-5
EMBED_LN_EPS = 1e-5
MMSEG_LN_EPS = 1e-6


# --------------------------------------------------------------------------------------------------------------
# 1. MiT encoder blocks
# --------------------------------------------------------------------------------------------------------------


class OverlapPatchEmbed(nn.Module):
    """Overlapped patch merging: a strided conv (7×7/4 pad 3 for stage 1, 3×3/2 pad 1 after) + LayerNorm.

    (B, C_in, H, W) → tokens (B, N, C) with N = h·w, and (h, w) = (⌊(H + 2p − k)/s⌋ + 1, …).
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int = 7, stride: int = 4,
                 norm_eps: float = EMBED_LN_EPS) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention with the key/value sequence reduced by ``sr_ratio`` (paper Eq. 2).

    Keys and values come from a conv with kernel = stride = ``sr_ratio`` over the (h, w) token map followed by a
    LayerNorm, so attention costs O(N²/sr_ratio²) (the paper's sequence ratio R = sr_ratio² = 64, 16, 4, 1).
    ``kv`` is one Linear whose first C outputs are K and last C are V (official layout; Hugging Face splits it into
    ``key``/``value``, the converter concatenates them). Scale ``head_dim^-0.5``. Tokens (B, N, C) with their map
    size (h, w) → (B, N, C).

    ``fused_attention`` (set by ``fuse()``) computes the same attention without materialising the (N × N/R) attention
    matrix: the native kernel where it runs (:func:`.native.attention`), else ``F.scaled_dot_product_attention``; the
    default explicit ``softmax(q kᵀ · scale) v`` is the official formulation and is what ``torch.utils.flop_counter``
    sees as matrix products.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_eps: float = EMBED_LN_EPS) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"EfficientSelfAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.fused_attention = False
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, d)
        keys_values = self.kv(self.reduce(x, hw)).reshape(B, -1, 2, self.num_heads, self.head_dim)
        k, v = keys_values.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N/R², d) each
        return self.proj_drop(self.proj(self.attend(q, k, v)))

    def reduce(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """The sequence reduction keys and values are computed from: (B, N, C) → (B, N/R², C) by the R×R, stride-R
        conv and its LayerNorm; the tokens themselves where R = 1. The tokens enter the conv as a channels-last view
        of the map, not a copy."""
        if self.sr_ratio == 1:
            return x
        B, _, C = x.shape
        x = x.reshape(B, *hw, C).permute(0, 3, 1, 2)
        R = self.sr_ratio
        if min(hw) < R:  # one comparison on the forward's common path
            # A map thinner than one R×R window (an input under ~29 px on a side), which the official conv refuses:
            # zero tokens below and to the right make it one window, as a zero-padded conv would. Exact elsewhere.
            x = F.pad(x, (0, max(R - hw[1], 0), 0, max(R - hw[0], 0)))
        x = self.sr(x)
        return self.norm(x.flatten(2).transpose(1, 2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``softmax(q kᵀ · scale) v`` for q (B, heads, N, d), k (B, heads, M, d), v (B, heads, M, dv), in token
        order (B, N, heads · dv). In the fused form (``fused_attention``) without dropout, the native kernel where it
        runs (:func:`.native.attention`: its time falls with the head width, which DynaSegFormer's gates narrow), else
        ``scaled_dot_product_attention``."""
        B, _, N, _ = q.shape
        if self.fused_attention:
            drop = self.attn_drop.p if self.training and isinstance(self.attn_drop, nn.Dropout) else 0.0
            out = native.attention(q, k, v, self.scale) if drop == 0.0 else None
            if out is not None:
                return out
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        else:
            x = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)) @ v
        return x.transpose(1, 2).reshape(B, N, -1)

    def fuse(self) -> EfficientSelfAttention:
        """Inference form: the same weights, attention by the native kernel or ``scaled_dot_product_attention``
        (:meth:`attend`), dropout removed, the sequence-reduction norm a :class:`~.layers.NativeLayerNorm`."""
        fused = fuse_modules(copy.deepcopy(self))
        fused.fused_attention = True
        return fused

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, fused_attention={self.fused_attention}"


class MixFFN(nn.Module):
    """Mix-FFN (paper Eq. 3): ``fc2(GELU(DWConv3×3(fc1(x))))``; the depthwise conv (with bias) leaks zero-padding
    position information, replacing positional encodings. GELU is the exact (erf) form. (B, N, C) → (B, N, C)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = channels_last_kernel_(nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, groups=hidden_dim, bias=True))
        self.act = InplaceGELU()  # its input is the conv's fresh output
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        x = self.fc1(x)
        # (B, N, C) viewed as (B, C, h, w) is a channels-last map: no copy in or out of the depthwise conv.
        x = self.dwconv(x.reshape(B, *hw, -1).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MixFFN(LN(x)))``."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 ln_eps: float = OFFICIAL_LN_EPS, sr_ln_eps: float = EMBED_LN_EPS) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop, norm_eps=sr_ln_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.jit.is_tracing():
            x = x + self.drop_path(self.attn(self.norm1(x), hw))
            return x + self.drop_path(self.mlp(self.norm2(x), hw))
        # Inference adds the residual into each branch's fresh output, still in cache, instead of writing a new
        # tensor: ~1 % of a fused B0 forward (same sums, bit for bit).
        x = self.drop_path(self.attn(self.norm1(x), hw)).add_(x)
        return self.drop_path(self.mlp(self.norm2(x), hw)).add_(x)


class MiTStage(nn.Module):
    """One encoder stage: OverlapPatchEmbed → ``depth`` Blocks → LayerNorm. (B, C_in, H, W) → (B, C, h, w).

    The returned map is a channels-last view of the token sequence (no copy); every consumer accepts it.
    """

    def __init__(self, in_channels: int, dim: int, depth: int, num_heads: int, sr_ratio: int, mlp_ratio: float,
                 patch_size: int, stride: int, drop_path: Sequence[float], qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, ln_eps: float = OFFICIAL_LN_EPS, embed_ln_eps: float = EMBED_LN_EPS) -> None:
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_channels, dim, patch_size, stride, norm_eps=embed_ln_eps)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, sr_ratio, mlp_ratio, qkv_bias, drop, attn_drop, drop_path[i], ln_eps, embed_ln_eps)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=ln_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, hw = self.patch_embed(x)
        for block in self.blocks:
            x = block(x, hw)
        x = self.norm(x)
        return x.reshape(x.shape[0], *hw, -1).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------------------------
# 2. The encoder
# --------------------------------------------------------------------------------------------------------------


class MixVisionTransformer(nn.Module):
    """MiT: four stages producing maps at 1/4, 1/8, 1/16, 1/32 with ``embed_dims`` channels (paper Fig. 2).

    Stochastic depth rises linearly from 0 to ``drop_path_rate`` over all blocks (official linspace rule).
    ``ln_eps`` is the eps of the block and stage LayerNorms (official 1e-6, Hugging Face 1e-5); ``embed_ln_eps`` that
    of the patch-embed and sequence-reduction norms (1e-5 in both; mmsegmentation's MiT uses 1e-6 there too).
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        sr_ratios: Sequence[int],
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        in_channels: int = 3,
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ln_eps: float = OFFICIAL_LN_EPS,
        embed_ln_eps: float = EMBED_LN_EPS,
    ) -> None:
        super().__init__()
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: also under a meta device
        stages, start, prev = [], 0, in_channels
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            stages.append(MiTStage(prev, dim, depth, num_heads[i], sr_ratios[i], mlp_ratios[i], patch_sizes[i],
                                   strides[i], dpr[start:start + depth], qkv_bias, drop_rate, attn_drop_rate, ln_eps,
                                   embed_ln_eps))
            start, prev = start + depth, dim
        self.stages = nn.ModuleList(stages)
        self.apply(_init_mit_weights)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) → [(B, C_1, H/4, W/4), (B, C_2, H/8, …), (B, C_3, H/16, …), (B, C_4, H/32, …)]
        (sizes rounded as the strided convs round them)."""
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    forward = forward_features

    def fuse(self) -> MixVisionTransformer:
        """A new inference encoder: attention by the native kernel or SDPA, dropout and drop-path removed, conv
        weights channels-last."""
        return fuse_modules(copy.deepcopy(self).eval()).to(memory_format=torch.channels_last)


def _init_mit_weights(m: nn.Module) -> None:
    """Official MiT init: Linear ~ trunc-normal(0.02), bias 0; LayerNorm (1, 0); conv ~ N(0, 2/fan_out)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------------------
# 3. Decoders
# --------------------------------------------------------------------------------------------------------------


def _project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear over the channels of a map: (B, C, h, w) → (B, E, h, w) (tokens in, channels-last view out).

    The view is built as (B, h, w, E) → permute so its strides are canonical channels-last, which is what
    ``interpolate`` and oneDNN check for before choosing their channels-last kernels.
    """
    B, _, h, w = x.shape
    return linear(x.flatten(2).transpose(1, 2)).reshape(B, h, w, -1).permute(0, 3, 1, 2)


class MLPDecoder(nn.Module):
    """The all-MLP decoder (paper Eq. 4): Linear(C_i → E) per stage, bilinear upsampling to the 1/4 map,
    concatenation, 1×1 conv 4E → E (no bias) + BN + ReLU, dropout, 1×1 classifier ``linear_pred``.

    The concatenation order is the official [c4, c3, c2, c1]; the fuse conv's input channels are in that order.
    (Official checkpoints also hold ``decode_head.conv_seg`` from mmseg's base head; it is never used and the
    converter drops it.) Four maps (B, C_i, h_i, w_i) → logits (B, K, h_1, w_1).
    """

    def __init__(self, in_channels: Sequence[int], embed_dim: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.linear_c = nn.ModuleList(nn.Linear(c, embed_dim) for c in in_channels)
        self.linear_fuse = ConvBN(len(in_channels) * embed_dim, embed_dim, 1, act=nn.ReLU)
        self.dropout = nn.Dropout2d(dropout)  # mmseg's BaseDecodeHead uses Dropout2d
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)
        nn.init.kaiming_normal_(self.linear_fuse.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv ConvModule
        for conv in (self.linear_fuse.conv, self.linear_pred):  # they run on channels-last maps
            channels_last_kernel_(conv)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        maps = [_project(linear, f) for linear, f in zip(self.linear_c, features)]
        maps = [maps[0]] + [resize(m, size) for m in maps[1:]]
        x = self.linear_fuse(torch.cat(maps[::-1], dim=1))  # official order [c4, c3, c2, c1]
        return self.linear_pred(self.dropout(x))

    @torch.no_grad()
    def to_additive(self, fold_bn: bool = True, dropout: float | None = None) -> AdditiveMLPDecoder:
        """The same decoder in additive form: the fuse conv folded into the per-stage Linears.

        A 1×1 conv commutes with bilinear resizing (both are linear, and bilinear weights sum to 1 so biases pass
        through), so ``F·cat(up(A_i x_i + a_i))`` = ``Σ_i up(F_i A_i x_i + F_i a_i)`` with F_i the fuse conv's slice
        for stage i: the 4E → E conv over the full-resolution concatenation disappears. With ``fold_bn`` (eval) the
        BN, a per-channel affine, folds in the same way, its shift added once, on the un-resized 1/4 stage
        (:meth:`fuse`); without, it stays a layer: DynaSegFormer's trainable decoder, which then starts computing
        exactly the teacher's, in train and eval mode. Composed in float64. ``dropout`` (before the classifier):
        this decoder's own by default.
        """
        if dropout is None:
            dropout = self.dropout.p if isinstance(self.dropout, nn.Dropout2d) else 0.0
        E = self.embed_dim
        n = len(self.linear_c)
        if fold_bn:
            weight, shift = _folded_fusion(self.linear_fuse)
        else:
            weight, shift = self.linear_fuse.conv.weight.flatten(1).double(), 0.0
        out = AdditiveMLPDecoder([lin.in_features for lin in self.linear_c], E, self.linear_pred.out_channels,
                                 batch_norm=not fold_bn, dropout=dropout).to(self.linear_fuse.conv.weight)
        for i, lin in enumerate(self.linear_c):
            part = weight[:, (n - 1 - i) * E:(n - i) * E]  # stage i sits at position n-1-i in [c4, c3, c2, c1]
            out.linear_c[i].weight.copy_(part @ lin.weight.double())
            out.linear_c[i].bias.copy_(part @ lin.bias.double() + (shift if i == 0 else 0.0))
        if not fold_bn:
            out.bn.load_state_dict(self.linear_fuse.bn.state_dict())
        out.linear_pred.load_state_dict(self.linear_pred.state_dict())
        return out

    @torch.no_grad()
    def fuse(self) -> AdditiveMLPDecoder:
        """The exact inference form (:meth:`to_additive` with the BN folded), its classifier padded."""
        out = self.to_additive(fold_bn=True, dropout=0.0)
        out.linear_pred = pad_output_channels(out.linear_pred)  # forward slices back to num_classes
        return out.eval()


class MMSegMLPDecoder(nn.Module):
    """The all-MLP decoder as open-mmlab mmsegmentation implements it (its ``SegformerHead``), which its model-zoo
    SegFormer checkpoints were trained with. Three differences from the official ``MLPDecoder``:

    - each stage's projection to E is a 1×1 conv without bias + BN + **ReLU** (mmcv's ``ConvModule``), not a Linear;
    - the upsampled maps are concatenated in input order [c1, c2, c3, c4] (official: [c4, c3, c2, c1]);
    - the classifier is mmseg's ``conv_seg`` (named ``linear_pred`` here, as in every edgeseg decoder).

    Then, as the official decoder: 1×1 conv 4E → E (no bias) + BN + ReLU, Dropout2d, classifier. Four maps
    (B, C_i, h_i, w_i) → logits (B, K, h_1, w_1).
    """

    def __init__(self, in_channels: Sequence[int], embed_dim: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.linear_c = nn.ModuleList(ConvBN(c, embed_dim, 1, act=nn.ReLU) for c in in_channels)
        self.linear_fuse = ConvBN(len(in_channels) * embed_dim, embed_dim, 1, act=nn.ReLU)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)
        for branch in (*self.linear_c, self.linear_fuse):  # mmcv ConvModule's init
            nn.init.kaiming_normal_(branch.conv.weight, mode="fan_out", nonlinearity="relu")
        for conv in (*(branch.conv for branch in self.linear_c), self.linear_fuse.conv, self.linear_pred):
            channels_last_kernel_(conv)  # they run on channels-last maps

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        maps = [branch(f) for branch, f in zip(self.linear_c, features)]
        maps = [maps[0]] + [resize(m, size) for m in maps[1:]]
        x = self.linear_fuse(torch.cat(maps, dim=1))  # mmseg's order [c1, c2, c3, c4]
        return self.linear_pred(self.dropout(x))

    @torch.no_grad()
    def fuse(self) -> AdditiveMLPDecoder:
        """The exact inference form: an ``AdditiveMLPDecoder`` whose stage branches are Linear → ReLU → Linear.

        Each branch's BN folds into its conv (now a Linear ``A_i``). The ReLU ``r_i = ReLU(A_i x_i + a_i)`` sits
        before the fusion conv, so that conv cannot fold into ``A_i``; but it still commutes with bilinear resizing:
        ``F·cat(up(r_i))`` = ``Σ_i up(F_i r_i)``, with F_i the fusion conv's input-channel block for stage i (BN
        scale folded) as a second Linear E → E run at stage i's own resolution. The BN shift goes to the un-resized
        1/4 stage. The 4E → E conv over the full-resolution concatenation disappears.
        """
        E = self.embed_dim
        weight, shift = _folded_fusion(self.linear_fuse)
        out = AdditiveMLPDecoder([b.conv.in_channels for b in self.linear_c], E, self.linear_pred.out_channels,
                                 batch_norm=False, dropout=0.0, stage_relu=True).to(self.linear_fuse.conv.weight)
        for i, branch in enumerate(self.linear_c):
            project, _, mix = out.linear_c[i]
            w, b = folded_bn_params(branch.conv, branch.bn)
            project.weight.copy_(w.flatten(1))
            project.bias.copy_(b)
            mix.weight.copy_(weight[:, i * E:(i + 1) * E])  # input order [c1, c2, c3, c4]
            mix.bias.copy_(shift if i == 0 else torch.zeros_like(shift))
        out.linear_pred.load_state_dict(self.linear_pred.state_dict())
        out.linear_pred = pad_output_channels(out.linear_pred)
        return out.eval()


def _folded_fusion(linear_fuse: ConvBN) -> tuple[torch.Tensor, torch.Tensor]:
    """The fusion conv 4E → E with its BN (eval) folded, composed in float64: weight (E, 4E) and shift (E,)."""
    scale, shift = bn_affine(linear_fuse.bn, torch.float64)
    return linear_fuse.conv.weight.flatten(1).double() * scale[:, None], shift


def _bands_are_exact(features: Sequence[torch.Tensor], band: int) -> bool:
    """Whether banded upsampling reproduces the whole pass bit for bit: every map's height divides the 1/4 map's
    by a power of two (the resize scale 2^-k is then exact in floating point); widths are resized whole."""
    H = features[0].shape[2]
    if band <= 0 or H <= band:
        return False
    for f in features[1:]:
        ratio, rem = divmod(H, f.shape[2])
        if rem or ratio & (ratio - 1):
            return False
    return True


def _resize_rows(y: torch.Tensor, H: int, W: int, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of ``resize(y, (H, W))``, from the few rows of ``y`` they read.

    With an integer scale s, output row r reads input rows ⌊(r + ½)/s − ½⌋ and the next. Resizing rows
    ``i0:i1`` (one row of margin on each side, so no border clamping happens inside the crop that the whole map
    would not do) to ``(i1 − i0)·s`` rows maps output row ``r − i0·s`` to the same source position minus ``i0``:
    the same two rows, the same weights.
    """
    h = y.shape[2]
    s = H // h
    i0, i1 = max(0, r0 // s - 1), min(h, (r1 - 1) // s + 2)
    up = resize(y[:, :, i0:i1], ((i1 - i0) * s, W))
    return up[:, :, r0 - i0 * s: r1 - i0 * s]


class AdditiveMLPDecoder(nn.Module):
    """The MLP decoder in additive form: ``Σ_i up(Linear_i(c_i))`` → [BN] → ReLU → dropout → classifier.

    This is ``MLPDecoder.fuse()``'s result (``batch_norm=False``, the projections already carrying the fuse conv
    and BN) and the decoder DynaSegFormer trains directly (``batch_norm=True``): per-stage projections to E,
    upsampled to the 1/4 map and added, never concatenated. Four maps (B, C_i, h_i, w_i) → (B, K, h_1, w_1).

    With ``stage_relu`` each stage's projection is ``Linear(C_i → E) → ReLU → Linear(E → E)``: the inference form
    of ``MMSegMLPDecoder``, whose per-stage ReLU keeps its fusion conv's block for the stage a separate Linear (run
    at the stage's own resolution, before the upsampling).
    """

    row_band = 16  # rows of the 1/4 map per band in eval mode (see ``_forward_in_bands``); 0 turns banding off
    native = True  # inference adds the resized maps in one C pass where the kernels build; False: PyTorch resizes

    def __init__(self, in_channels: Sequence[int], embed_dim: int, num_classes: int, batch_norm: bool = True,
                 dropout: float = 0.1, stage_relu: bool = False) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.linear_c = nn.ModuleList(
            nn.Sequential(nn.Linear(c, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim)) if stage_relu
            else nn.Linear(c, embed_dim)
            for c in in_channels
        )
        self.bn = nn.BatchNorm2d(embed_dim) if batch_norm else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        # Traced or captured (ONNX export, torch.export, torch.compile), one whole pass is the smaller graph: no bands.
        # With autograd on (saliency maps, attacks on an eval-mode model) neither: the bands write the logits in place.
        if (not self.training and not torch.is_grad_enabled() and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling() and _bands_are_exact(features, self.row_band)):
            return self._forward_in_bands(features)
        size = features[0].shape[2:]
        # Everything stays channels-last (the projections' natural layout): the upsampling and the sums then
        # run over contiguous channel vectors, with no layout copies of the full-resolution maps.
        x = _project(self.linear_c[0], features[0])  # a fresh tensor: safe to accumulate into in place
        maps = [_project(linear, f) for linear, f in zip(self.linear_c[1:], features[1:])]
        return self._classify(self.dropout(self._sum_and_activate(x, maps, 0, size))).permute(0, 3, 1, 2)

    def _sum_and_activate(self, x: torch.Tensor, maps: Sequence[torch.Tensor], r0: int,
                          size: Sequence[int]) -> torch.Tensor:
        """``act(bn(x + Σ resized maps))`` for rows ``r0 …`` of the ``size`` map (or all of them), ``x`` updated in
        place: in one native pass over ``x`` where it runs (:func:`.native.resize_add_`: inference, CPU float32,
        the ReLU in the same pass when no BN sits before it — folded, as in ``fuse()``), else by PyTorch resizes (a
        band's rows from :func:`_resize_rows`, bit-identical to the whole pass)."""
        relu_next = isinstance(self.bn, nn.Identity) and isinstance(self.act, nn.ReLU)
        if self.native and native.resize_add_(x, maps, r0, size[0], relu=relu_next):
            return x if relu_next else self.act(self.bn(x))
        rows = x.shape[2]
        for y in maps:
            x.add_(resize(y, size) if rows == size[0] else _resize_rows(y, *size, r0, r0 + rows))
        return self.act(self.bn(x))

    def _classify(self, x: torch.Tensor) -> torch.Tensor:
        """The 1×1 classifier as one GEMM over the (B, h, w, E) view of a channels-last map: no im2col, no layout
        reorder. Returns (B, h, w, K) logits; fused, the padded outputs (``pad_output_channels``) are sliced off."""
        weight = self.linear_pred.weight
        logits = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), self.linear_pred.bias)
        return logits[..., : self.num_classes]

    def _forward_in_bands(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The same logits, computed ``row_band`` rows of the 1/4 map at a time (eval mode: BN is per-pixel).

        Whole, the decoder writes and re-reads upsampled E-channel maps at 1/4 resolution (16 MB each for B0 at
        512², 128 MB at 1024×2048) before the classifier reads their sum; in bands of 16 rows they never exist whole,
        which cuts the memory a fused B0 forward adds by about 40 % (benchmarks/decoder_bands.py), what limits
        small devices. The resizes are bit-identical to the whole pass (:func:`_resize_rows`); where the native
        kernels are built, each band instead gets all its resized maps added in one pass (:func:`.native.resize_add_`).
        The logits are a view of the classifier's output: with a padded classifier (``fuse()``) their pixels are K'
        floats apart (copying the K kept ones out of each band cost ~2 % of a fused B0 forward).
        """
        c1, *rest = features
        B, _, H, W = c1.shape
        small = [_project(linear, f) for linear, f in zip(self.linear_c[1:], rest)]  # at 1/8…1/32: whole, once
        weight = self.linear_pred.weight.flatten(1).t()  # (E, K'), K' ≥ K when fuse() padded the classifier
        logits = c1.new_empty(B, H, W, weight.shape[1])
        for r0 in range(0, H, self.row_band):
            r1 = min(H, r0 + self.row_band)
            x = self._sum_and_activate(_project(self.linear_c[0], c1[:, :, r0:r1]), small, r0, (H, W))
            x = x.permute(0, 2, 3, 1)  # (B, rows, W, E), each image contiguous
            for b in range(B):  # the classifier writes its rows of the logits in place: no band copied after it
                torch.addmm(self.linear_pred.bias, x[b].reshape(-1, x.shape[-1]), weight,
                            out=logits[b, r0:r1].view(-1, weight.shape[1]))
        return logits[..., : self.num_classes].permute(0, 3, 1, 2)

    @torch.no_grad()
    def fuse(self) -> AdditiveMLPDecoder:
        """Fold the BN (if any) into the projections (their last Linear): the affine fold of ``MLPDecoder.fuse``,
        its shift once, on the un-resized 1/4 stage."""
        fused = copy.deepcopy(self).eval()
        if isinstance(self.bn, nn.BatchNorm2d):
            scale, shift = bn_affine(self.bn)
            last = [branch[-1] if isinstance(branch, nn.Sequential) else branch for branch in fused.linear_c]
            for lin in last:
                lin.weight.mul_(scale[:, None])
                lin.bias.mul_(scale)
            last[0].bias.add_(shift)
            fused.bn = nn.Identity()
        fused.dropout = nn.Identity()
        if fused.linear_pred.out_channels == self.num_classes:
            fused.linear_pred = pad_output_channels(fused.linear_pred)
        return fused


# --------------------------------------------------------------------------------------------------------------
# 4. The models
# --------------------------------------------------------------------------------------------------------------


class SegFormer(nn.Module):
    """MiT encoder → MLP decoder. (B, 3, H, W) normalised images → logits at 1/4: (B, K, ⌊(H−1)/4⌋+1, ⌊(W−1)/4⌋+1).

    Upsample them bilinearly (``align_corners=False``) to (H, W) for per-pixel labels, as mmseg does at test time.
    ``decoder`` is ``"official"`` (NVlabs' ``MLPDecoder``) or ``"mmseg"`` (mmsegmentation's ``MMSegMLPDecoder``,
    which its model zoo was trained with; such files also need ``embed_ln_eps=1e-6``).
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        sr_ratios: Sequence[int],
        decoder_dim: int,
        num_classes: int = 150,
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        in_channels: int = 3,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        dropout: float = 0.1,
        ln_eps: float = OFFICIAL_LN_EPS,
        embed_ln_eps: float = EMBED_LN_EPS,
        decoder: str = "official",
    ) -> None:
        super().__init__()
        if decoder not in ("official", "mmseg"):
            raise ValueError(f"SegFormer decoder must be 'official' (NVlabs) or 'mmseg' (mmsegmentation), "
                             f"not {decoder!r}")
        self.num_classes = num_classes
        self.encoder = MixVisionTransformer(embed_dims, depths, num_heads, sr_ratios, mlp_ratios, in_channels,
                                            drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                            drop_path_rate=drop_path_rate, ln_eps=ln_eps, embed_ln_eps=embed_ln_eps)
        head = MLPDecoder if decoder == "official" else MMSegMLPDecoder
        self.decode_head = head(embed_dims, decoder_dim, num_classes, dropout)
        self.model_name = "segformer"
        self.model_args: dict = {"num_classes": num_classes}

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) → the four encoder maps (B, C_i, H/4 … H/32, W/4 … W/32)."""
        return self.encoder.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.encoder.forward_features(x))

    def fuse(self) -> SegFormer:
        """A new inference model: the decoder in additive form (fuse conv and BN folded into the per-stage
        projections; see ``MLPDecoder.fuse`` and ``MMSegMLPDecoder.fuse``), attention by the native kernel or SDPA,
        dropout/drop-path removed, conv weights channels-last (the token sequences are channels-last maps already,
        so oneDNN then runs the convs without layout reorders). Same logits (≤ 1e-5); in eval mode they are a
        channels-last view of the padded classifier's output (``.contiguous()`` where a dense tensor is needed)."""
        return fuse_modules(copy.deepcopy(self).eval()).to(memory_format=torch.channels_last)


class MiTClassifier(nn.Module):
    """The ImageNet form of the encoder (official ``mit_bX.pth``): MiT → mean over the last stage's tokens (after
    its LayerNorm) → Linear ``head``. (B, 3, H, W) → (B, num_classes).

    The encoder sits under ``encoder.`` exactly as in ``SegFormer``, so an ImageNet file initialises a
    segmentation model's encoder key for key.
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        sr_ratios: Sequence[int],
        num_classes: int = 1000,
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        in_channels: int = 3,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ln_eps: float = OFFICIAL_LN_EPS,
        embed_ln_eps: float = EMBED_LN_EPS,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = MixVisionTransformer(embed_dims, depths, num_heads, sr_ratios, mlp_ratios, in_channels,
                                            drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                            drop_path_rate=drop_path_rate, ln_eps=ln_eps, embed_ln_eps=embed_ln_eps)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        _init_mit_weights(self.head)
        self.model_name = "mit"
        self.model_args: dict = {"num_classes": num_classes}

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) → the four encoder maps (B, C_i, H/4 … H/32, W/4 … W/32)."""
        return self.encoder.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.forward_features(x)[-1].mean(dim=(2, 3)))

    def fuse(self) -> MiTClassifier:
        """A new inference model (attention by the native kernel or SDPA, drop-path removed, conv weights
        channels-last)."""
        return fuse_modules(copy.deepcopy(self).eval()).to(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------------------
# 5. Variants (official mix_transformer.py mit_b0…mit_b5 and local_configs/segformer/B*/…)
# --------------------------------------------------------------------------------------------------------------

# All variants share heads (1, 2, 5, 8), sr ratios (8, 4, 2, 1), mlp ratio 4, qkv bias, patch sizes (7, 3, 3, 3),
# strides (4, 2, 2, 2), drop path 0.1; B0 vs B1 differ in widths, B1…B5 in depths; the decoder is 256 wide for
# B0/B1 and 768 for B2…B5 (configs' decoder_params.embed_dim).
VARIANTS: dict[str, dict] = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_dim=256),
    "b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), decoder_dim=256),
    "b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), decoder_dim=768),
    "b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3), decoder_dim=768),
    "b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3), decoder_dim=768),
    "b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), decoder_dim=768),
}
SHARED: dict = dict(num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1), mlp_ratios=(4, 4, 4, 4))

# Paper Table 1 (ADE20K, 150 classes): params (M, encoder + decoder columns), GMACs ("FLOPs" in the paper) at the
# input size of the ADE20K config (640×640 for B5). The paper counts the attention matrix products.
PAPER: dict[str, dict] = {
    "segformer-b0": {"params_m": 3.8, "gmacs": 8.4, "input_size": [512, 512], "num_classes": 150},
    "segformer-b1": {"params_m": 13.7, "gmacs": 15.9, "input_size": [512, 512], "num_classes": 150},
    "segformer-b2": {"params_m": 27.5, "gmacs": 62.4, "input_size": [512, 512], "num_classes": 150},
    "segformer-b3": {"params_m": 47.3, "gmacs": 79.0, "input_size": [512, 512], "num_classes": 150},
    "segformer-b4": {"params_m": 64.1, "gmacs": 95.7, "input_size": [512, 512], "num_classes": 150},
    "segformer-b5": {"params_m": 84.7, "gmacs": 183.3, "input_size": [640, 640], "num_classes": 150},
}
# The input size each model is counted at when none is asked for (``edgeseg info``): its ADE20K recipe's crop, and
# ImageNet's 224² for the bare encoders.
INPUT_SIZES: dict[str, tuple[int, int]] = {
    **{f"segformer-{v}": (640, 640) if v == "b5" else (512, 512) for v in VARIANTS},
    **{f"mit-{v}": (224, 224) for v in VARIANTS},
}


# --------------------------------------------------------------------------------------------------------------
# 6. Checkpoint layouts → edgeseg
# --------------------------------------------------------------------------------------------------------------

# Each layout: ordered (regex, replacement) rules over the encoder part of a key, producing edgeseg names under
# ``encoder.``. Keys / values arrive split in Hugging Face files as temporary ``attn.k`` / ``attn.v``, and Q, K, V
# joined in mmsegmentation files as a temporary ``attn.in_proj``.
_OFFICIAL_ENCODER = (  # NVlabs mix_transformer.py, also the bare keys of mit_bX.pth
    (r"^patch_embed(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.patch_embed."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (r"^norm(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.norm."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
)
_HF_ENCODER = (  # transformers' checkpoint names (the Hub files; save_pretrained writes these too)
    (r"^encoder\.patch_embeddings\.(\d)\.layer_norm\.", r"stages.\1.patch_embed.norm."),
    (r"^encoder\.patch_embeddings\.(\d)\.", r"stages.\1.patch_embed."),
    (r"^encoder\.block\.(\d)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^encoder\.layer_norm\.(\d)\.", r"stages.\1.norm."),
    (r"\.attention\.self\.query\.", ".attn.q."),
    (r"\.attention\.self\.key\.", ".attn.k."),
    (r"\.attention\.self\.value\.", ".attn.v."),
    (r"\.attention\.self\.sr\.", ".attn.sr."),
    (r"\.attention\.self\.layer_norm\.", ".attn.norm."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.layer_norm_1\.", ".norm1."),
    (r"\.layer_norm_2\.", ".norm2."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
)
_HF_MODULE_ENCODER = (  # transformers >= 5 in-memory module names (model.state_dict())
    (r"^stages\.(\d)\.patch_embeddings\.layer_norm\.", r"stages.\1.patch_embed.norm."),
    (r"^stages\.(\d)\.patch_embeddings\.", r"stages.\1.patch_embed."),
    (r"^stages\.(\d)\.layer_norm\.", r"stages.\1.norm."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.q_proj\.", ".attn.q."),
    (r"\.attention\.k_proj\.", ".attn.k."),
    (r"\.attention\.v_proj\.", ".attn.v."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attn.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attn.norm."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
)
_MMSEG_ENCODER = (  # open-mmlab mmseg backbones/mit.py (layers.i = [PatchEmbed, blocks, LayerNorm]); mit2mmseg.py
    (r"^layers\.(\d)\.0\.projection\.", r"stages.\1.patch_embed.proj."),
    (r"^layers\.(\d)\.0\.norm\.", r"stages.\1.patch_embed.norm."),
    (r"^layers\.(\d)\.1\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^layers\.(\d)\.2\.", r"stages.\1.norm."),
    (r"\.attn\.attn\.in_proj_(weight|bias)$", r".attn.in_proj.\1"),  # nn.MultiheadAttention: [W_q; W_k; W_v]
    (r"\.attn\.attn\.out_proj\.", ".attn.proj."),
    (r"\.ffn\.layers\.0\.", ".mlp.fc1."),  # FFN Sequential [fc1, dwconv, GELU, Dropout, fc2, Dropout]
    (r"\.ffn\.layers\.1\.", ".mlp.dwconv."),
    (r"\.ffn\.layers\.4\.", ".mlp.fc2."),
)
_OFFICIAL_HEAD = (
    (r"^decode_head\.linear_c(\d)\.proj\.", lambda m: f"decode_head.linear_c.{int(m[1]) - 1}."),
)
_HF_HEAD = (
    (r"^decode_head\.(linear_c|linear_projections)\.(\d)\.proj\.", r"decode_head.linear_c.\2."),
    (r"^decode_head\.linear_fuse\.weight$", "decode_head.linear_fuse.conv.weight"),
    (r"^decode_head\.batch_norm\.", "decode_head.linear_fuse.bn."),
    (r"^decode_head\.classifier\.", "decode_head.linear_pred."),
    (r"^classifier\.", "head."),  # SegformerForImageClassification
)
_MMSEG_HEAD = (  # mmseg decode_heads/segformer_head.py: ConvModules (conv, bn) and the base head's conv_seg
    (r"^decode_head\.convs\.(\d)\.", r"decode_head.linear_c.\1."),
    (r"^decode_head\.fusion_conv\.", "decode_head.linear_fuse."),
    (r"^decode_head\.conv_seg\.", "decode_head.linear_pred."),
)
_HF_LAYOUT_NOTE = ("Hugging Face layout: transformers builds every SegFormer LayerNorm with eps 1e-5; build the model "
                   "with ln_eps=1e-5 (load_hf_folder does) to reproduce its outputs exactly")
_MMSEG_LAYOUT_NOTE = ("mmsegmentation layout (open-mmlab MixVisionTransformer): attn.in_proj split into q and kv, the "
                      "FFN's 1x1 convs as Linears; mmseg builds every LayerNorm with eps 1e-6: build the model with "
                      "embed_ln_eps=1e-6 (load_model does) to reproduce its outputs exactly")
_MMSEG_HEAD_NOTE = ("mmsegmentation's SegformerHead (conv+BN+ReLU per stage, concatenation [c1..c4], conv_seg the "
                    "classifier): a decoder='mmseg' model holds it")


def _rename_key(rules: Sequence[tuple[str, str | Callable]], key: str) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _split_in_proj(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split mmseg's joined ``attn.in_proj`` ([W_q; W_k; W_v], 3C rows) into ``attn.q`` (first C rows) and the
    official ``attn.kv`` (last 2C: K then V), and squeeze its 1×1-conv FFN weights (4C, C, 1, 1) to Linear shapes."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".attn.in_proj." in key:
            dim = value.shape[0] // 3
            out[key.replace(".attn.in_proj.", ".attn.q.")] = value[:dim]
            out[key.replace(".attn.in_proj.", ".attn.kv.")] = value[dim:]
        elif re.search(r"\.mlp\.fc[12]\.weight$", key) and value.ndim == 4:
            out[key] = value.flatten(1)
        else:
            out[key] = value
    return out


def _merge_kv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate split ``attn.k``/``attn.v`` into the official ``attn.kv`` (first C rows K, last C rows V)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".attn.k." in key:
            other = sd.get(key.replace(".attn.k.", ".attn.v."))
            if other is None:
                raise ValueError(f"state dict has {key} but no matching value projection")
            out[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([value, other], dim=0)
        elif ".attn.v." not in key:
            out[key] = value
    return out


_OWN_KEY = re.compile(
    r"^(encoder\.stages\.\d+\.(patch_embed\.(proj|norm)|norm|blocks\.\d+\.(norm1|norm2|attn\.(q|kv|proj|sr|norm)"
    r"|mlp\.(fc1|fc2|dwconv)))\.(weight|bias)"
    r"|decode_head\.(linear_c\.\d+(\.conv|\.bn)?|linear_pred|linear_fuse\.conv|linear_fuse\.bn|bn)\."
    r"(weight|bias|running_mean|running_var|num_batches_tracked)"
    r"|head\.(weight|bias))$"
)


def _layout(keys: Sequence[str]) -> str | None:
    """Name the layout of a state dict from signature keys, or None if it is not SegFormer's."""
    keyset = set(keys)

    def has(pattern: str) -> bool:
        return any(re.match(pattern, k) for k in keyset)

    if "encoder.stages.0.patch_embed.proj.weight" in keyset:
        # Ours only if every key is a SegFormer/MiT key: models that extend this layout (DynaSegFormer's gates)
        # belong to their own family's converter.
        return "edgeseg" if all(_OWN_KEY.match(k) for k in keyset) else None
    if has(r"^(segformer\.)?encoder\.patch_embeddings\.0\.proj\.weight$"):
        return "hf"
    if has(r"^(segformer\.)?stages\.0\.patch_embeddings\.proj\.weight$"):
        return "hf-modules"
    if has(r"^(backbone\.)?patch_embed1\.proj\.weight$") and has(r"^(backbone\.)?block1\.0\.attn\.kv\.weight$"):
        return "official"
    if (has(r"^(backbone\.)?layers\.0\.0\.projection\.weight$")
            and has(r"^(backbone\.)?layers\.0\.1\.0\.attn\.attn\.in_proj_weight$")):
        return "mmseg"
    return None


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """Map any SegFormer / MiT layout onto edgeseg's; ``None`` if the keys are not SegFormer's.

    Layouts: official NVlabs mmseg (``backbone.patch_embed1.proj``, ``backbone.block1.0.attn.kv``,
    ``decode_head.linear_c1.proj``, ``decode_head.linear_fuse.conv/bn``, ``decode_head.linear_pred``; the unused
    ``decode_head.conv_seg`` is dropped), the ImageNet files ``mit_bX.pth`` (the same backbone keys bare, plus
    ``head.*``), Hugging Face (``segformer.encoder.*`` as in Hub files and ``save_pretrained``, or transformers-5
    module names ``segformer.stages.*``; split key/value, ``decode_head.linear_c.N``, ``linear_fuse``,
    ``batch_norm``, ``classifier``), open-mmlab mmsegmentation's own (its model zoo: ``backbone.layers.i.{0,1,2}``
    with ``attn.attn.in_proj_weight`` and ``ffn.layers.{0,1,4}``, ``decode_head.convs.N.conv/bn``,
    ``decode_head.fusion_conv.conv/bn``, ``decode_head.conv_seg`` — here the classifier; and the bare backbone keys
    that its ``mit2mmseg.py`` writes for ``mit_bX``) and edgeseg's own. An mmseg decode head maps onto
    ``MMSegMLPDecoder``'s keys, which ``infer_model`` recognises.
    """
    layout = _layout(list(state_dict))
    if layout is None:
        return None
    notes: list[str] = []
    if layout == "edgeseg":
        return dict(state_dict), notes
    if layout == "official":
        encoder_rules, head_rules, prefix = _OFFICIAL_ENCODER, _OFFICIAL_HEAD, "backbone."
        notes.append("official NVlabs/SegFormer layout")
    elif layout == "mmseg":
        encoder_rules, head_rules, prefix = _MMSEG_ENCODER, _MMSEG_HEAD, "backbone."
        notes.append(_MMSEG_LAYOUT_NOTE)
        if any(k.startswith("decode_head.") for k in state_dict):
            notes.append(_MMSEG_HEAD_NOTE)
    else:
        encoder_rules = _HF_ENCODER if layout == "hf" else _HF_MODULE_ENCODER
        head_rules, prefix = _HF_HEAD, "segformer."
        notes.append(_HF_LAYOUT_NOTE)
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        if key.startswith("decode_head.conv_seg.") and layout != "mmseg":
            dropped.append(key)
            continue
        if key.startswith(("decode_head.", "classifier.")) or (layout == "official" and key.startswith("head.")):
            out[_rename_key(head_rules, key)] = value
            continue
        bare = key[len(prefix):] if key.startswith(prefix) else key
        out["encoder." + _rename_key(encoder_rules, bare)] = value
    if dropped:
        notes.append("dropped decode_head.conv_seg (created by mmseg's BaseDecodeHead, never used by SegFormerHead)")
    if layout == "mmseg":
        out = _split_in_proj(out)
    elif layout != "official":
        out = _merge_kv(out)
        notes.append("concatenated key/value projections into attn.kv (K first, then V)")
    return out, notes


def layout_args(state_dict: dict[str, torch.Tensor]) -> dict:
    """Builder overrides that a checkpoint's layout implies but no tensor shape shows (``load_model`` adds them to
    ``infer_model``'s): mmsegmentation's MiT has LayerNorm eps 1e-6 in its patch embeddings and sequence reduction
    too, so its files are built with ``embed_ln_eps=1e-6``; a Hugging Face weights file given without its folder
    gets transformers' block eps, as the folder would."""
    layout = _layout(list(state_dict))
    if layout == "mmseg":
        return {"embed_ln_eps": MMSEG_LN_EPS}
    return {"ln_eps": HF_LN_EPS} if layout in ("hf", "hf-modules") else {}


def closest_variant(embed_dims: Sequence[int], depths: Sequence[int]) -> str:
    """The variant with these widths and depths; for a custom shape the one sharing its depths (B2…B5 differ only
    there), else its widths, else B0 — the builder overrides carry the rest."""
    dims, depths = list(embed_dims), list(depths)
    for match in (lambda c: list(c["embed_dims"]) == dims and list(c["depths"]) == depths,
                  lambda c: list(c["depths"]) == depths,
                  lambda c: list(c["embed_dims"]) == dims):
        found = next((v for v, cfg in VARIANTS.items() if match(cfg)), None)
        if found is not None:
            return found
    return "b0"


def infer_model(state_dict: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """From an edgeseg-layout state dict, the builder name and kwargs that rebuild exactly this architecture.

    Widths, depths, sr ratios, mlp ratios, decoder width and classes are read off tensor shapes; the variant is the
    one whose widths and depths match (B0 vs B1 differ by widths, B1…B5 by depths). Head counts leave no trace in
    the weights: the official (1, 2, 5, 8) is assumed. ``segformer-*`` if a decode head is present, else ``mit-*``;
    ``decoder="mmseg"`` if the per-stage projections are conv+BN (``MMSegMLPDecoder``). LayerNorm eps leave no trace
    either: see ``layout_args``.
    """
    sd = state_dict
    dims, depths, srs, mlps = [], [], [], []
    while (w := sd.get(f"encoder.stages.{len(dims)}.patch_embed.proj.weight")) is not None:
        i = len(dims)
        dims.append(w.shape[0])
        blocks = {int(m[1]) for k in sd if (m := re.match(rf"encoder\.stages\.{i}\.blocks\.(\d+)\.", k))}
        depths.append(len(blocks))
        sr = sd.get(f"encoder.stages.{i}.blocks.0.attn.sr.weight")
        srs.append(sr.shape[-1] if sr is not None else 1)
        fc1 = sd.get(f"encoder.stages.{i}.blocks.0.mlp.fc1.weight")
        ratio = fc1.shape[0] / w.shape[0] if fc1 is not None else 4
        mlps.append(int(ratio) if float(ratio).is_integer() else ratio)
    if len(dims) != 4 or 0 in depths:
        raise ValueError(f"state dict is not a SegFormer/MiT model (found {len(dims)} encoder stages, depths {depths})")
    in_channels = sd["encoder.stages.0.patch_embed.proj.weight"].shape[1]
    seg = "decode_head.linear_pred.weight" in sd
    variant = closest_variant(dims, depths)
    base = {**SHARED, **VARIANTS[variant]}
    args: dict = {}
    if seg:
        args["num_classes"] = sd["decode_head.linear_pred.weight"].shape[0]
        mmseg_head = "decode_head.linear_c.0.conv.weight" in sd
        decoder_dim = sd[f"decode_head.linear_c.0.{'conv.' if mmseg_head else ''}weight"].shape[0]
        if decoder_dim != base["decoder_dim"]:
            args["decoder_dim"] = decoder_dim
        if mmseg_head:
            args["decoder"] = "mmseg"
    else:
        args["num_classes"] = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    for name, found in (("embed_dims", dims), ("depths", depths), ("sr_ratios", srs), ("mlp_ratios", mlps)):
        if found != list(base[name]):
            args[name] = found
    if in_channels != 3:
        args["in_channels"] = in_channels
    if any(d % h for d, h in zip(dims, base["num_heads"])):
        raise ValueError(f"SegFormer widths {dims} are not divisible by the official head counts "
                         f"{list(base['num_heads'])}; pass num_heads=... when building the model")
    return f"{'segformer' if seg else 'mit'}-{variant}", args


# --------------------------------------------------------------------------------------------------------------
# 7. Builders
# --------------------------------------------------------------------------------------------------------------

_ENCODER_ARGS = ("embed_dims", "depths", "num_heads", "sr_ratios", "mlp_ratios", "in_channels", "drop_rate",
                 "attn_drop_rate", "drop_path_rate", "ln_eps", "embed_ln_eps")
_SEG_ARGS = _ENCODER_ARGS + ("decoder_dim", "dropout", "decoder")


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _create(variant: str, classifier: bool, num_classes: int, overrides: dict) -> nn.Module:
    allowed = _ENCODER_ARGS if classifier else _SEG_ARGS
    check_overrides(MiTClassifier if classifier else SegFormer, overrides, "SegFormer", allowed)
    cfg = {**SHARED, **VARIANTS[variant], **overrides}
    if classifier:
        cfg.pop("decoder_dim")
        model: nn.Module = MiTClassifier(num_classes=num_classes, **cfg)
    else:
        model = SegFormer(num_classes=num_classes, **cfg)
    model.model_name = f"{'mit' if classifier else 'segformer'}-{variant}"
    model.model_args = {"num_classes": num_classes, **{k: _jsonable(v) for k, v in overrides.items()}}
    return model


def segformer_b0(num_classes: int = 150, **overrides: Any) -> SegFormer:
    """SegFormer-B0 (3.8 M params, 8.4 GMACs at 512²)."""
    return _create("b0", False, num_classes, overrides)


def segformer_b1(num_classes: int = 150, **overrides: Any) -> SegFormer:
    """SegFormer-B1 (13.7 M params, 15.9 GMACs at 512²)."""
    return _create("b1", False, num_classes, overrides)


def segformer_b2(num_classes: int = 150, **overrides: Any) -> SegFormer:
    """SegFormer-B2 (27.5 M params, 62.4 GMACs at 512²)."""
    return _create("b2", False, num_classes, overrides)


def segformer_b3(num_classes: int = 150, **overrides: Any) -> SegFormer:
    """SegFormer-B3 (47.3 M params, 79.0 GMACs at 512²)."""
    return _create("b3", False, num_classes, overrides)


def segformer_b4(num_classes: int = 150, **overrides: Any) -> SegFormer:
    """SegFormer-B4 (64.1 M params, 95.7 GMACs at 512²)."""
    return _create("b4", False, num_classes, overrides)


def segformer_b5(num_classes: int = 150, **overrides: Any) -> SegFormer:
    """SegFormer-B5 (84.7 M params, 183.3 GMACs at 640², its ADE20K size)."""
    return _create("b5", False, num_classes, overrides)


def mit_b0(num_classes: int = 1000, **overrides: Any) -> MiTClassifier:
    """MiT-B0 ImageNet classifier (official ``mit_b0.pth``): SegFormer-B0's encoder."""
    return _create("b0", True, num_classes, overrides)


def mit_b1(num_classes: int = 1000, **overrides: Any) -> MiTClassifier:
    """MiT-B1 ImageNet classifier (official ``mit_b1.pth``): SegFormer-B1's encoder."""
    return _create("b1", True, num_classes, overrides)


def mit_b2(num_classes: int = 1000, **overrides: Any) -> MiTClassifier:
    """MiT-B2 ImageNet classifier (official ``mit_b2.pth``): SegFormer-B2's encoder."""
    return _create("b2", True, num_classes, overrides)


def mit_b3(num_classes: int = 1000, **overrides: Any) -> MiTClassifier:
    """MiT-B3 ImageNet classifier (official ``mit_b3.pth``): SegFormer-B3's encoder."""
    return _create("b3", True, num_classes, overrides)


def mit_b4(num_classes: int = 1000, **overrides: Any) -> MiTClassifier:
    """MiT-B4 ImageNet classifier (official ``mit_b4.pth``): SegFormer-B4's encoder."""
    return _create("b4", True, num_classes, overrides)


def mit_b5(num_classes: int = 1000, **overrides: Any) -> MiTClassifier:
    """MiT-B5 ImageNet classifier (official ``mit_b5.pth``): SegFormer-B5's encoder."""
    return _create("b5", True, num_classes, overrides)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "segformer-b0": segformer_b0,
    "segformer-b1": segformer_b1,
    "segformer-b2": segformer_b2,
    "segformer-b3": segformer_b3,
    "segformer-b4": segformer_b4,
    "segformer-b5": segformer_b5,
    "mit-b0": mit_b0,
    "mit-b1": mit_b1,
    "mit-b2": mit_b2,
    "mit-b3": mit_b3,
    "mit-b4": mit_b4,
    "mit-b5": mit_b5,
}
