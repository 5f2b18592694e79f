"""The few building blocks shared by the model families.

Every block here knows how to fold itself for inference (``fuse()``), so a model's ``fuse()`` is a walk over its
children rather than a second implementation of the network.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import native


def bn_affine(bn: nn.BatchNorm1d | nn.BatchNorm2d,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BN in eval mode as the per-channel affine ``x·scale + shift`` (``γ/σ``, ``β − μγ/σ``): what every fold of
    a BN into the layer before or after it needs; ``dtype`` composes in higher precision."""
    weight, bias, mean, var = (t if dtype is None else t.to(dtype)
                               for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - mean * scale


def folded_bn_params(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the one conv computing ``bn(conv(x))`` in eval mode: ``W·γ/σ``, ``(b − μ)·γ/σ + β``."""
    scale, _ = bn_affine(bn)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * scale.reshape(-1, 1, 1, 1), (bias - bn.running_mean) * scale + bn.bias


class InplaceGELU(nn.GELU):
    """``nn.GELU`` computed in place when nothing records a graph (inference; eager, no autograd): its input must be
    a fresh tensor no one reads again, as a conv's output is. SegFormer's Mix-FFN applies GELU to maps of 2–8 MB at
    1/4 resolution; not allocating and filling a second one makes a fused B0 forward ~2 % faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return super().forward(x)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


class NativeLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (over the last axis, with an affine) whose inference runs the native kernel
    (:func:`.native.layer_norm`) where it applies, PyTorch's otherwise. ``fuse_modules`` puts one in place of every
    ``nn.LayerNorm``: SegFormer-B0's 32-channel stage-1 tokens make PyTorch's per-row overhead ~3 % of a fused
    forward. Same parameters, eps and state-dict keys."""

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm) -> NativeLayerNorm:
        like = {"device": norm.weight.device, "dtype": norm.weight.dtype} if norm.weight is not None else {}
        new = cls(norm.normalized_shape, norm.eps, norm.elementwise_affine, bias=norm.bias is not None, **like)
        new.load_state_dict(norm.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) == 1 and self.weight is not None and self.bias is not None:
            y = native.layer_norm(x, self.weight, self.bias, self.eps)
            if y is not None:
                return y
        return super().forward(x)


def channels_last_kernel_(conv: nn.Conv2d) -> nn.Conv2d:
    """Give ``conv.weight`` channels-last strides, in place, for a conv that runs on channels-last maps.

    For a depthwise or 1×1 kernel both layouts are the same bytes, but autograd returns the weight's gradient with
    the input's (channels-last) strides, and DDP, whose gradient buckets take each parameter's strides, would then
    copy that gradient every step and warn "Grad strides do not match bucket view strides".
    """
    weight = conv.weight
    with torch.no_grad():
        restrided = torch.empty_like(weight, memory_format=torch.channels_last).copy_(weight)
    conv.weight = nn.Parameter(restrided, requires_grad=weight.requires_grad)
    return conv


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a conv computing ``bn(conv(x))`` in eval mode (:func:`folded_bn_params`)."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    weight, bias = folded_bn_params(conv, bn)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused


class ConvBN(nn.Sequential):
    """Conv2d (no bias) followed by BatchNorm2d, with an optional activation.

    Children are named ``conv``/``bn``/``act`` so state-dict keys read as what they are; family converters map
    the official names (``c``/``bn``, mmcv's ``conv``/``bn``) onto these.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        act: type[nn.Module] | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels)
        if act is not None:
            self.act = act()

    def fuse(self) -> nn.Module:
        """Fold BN into the conv; the activation (if any) stays after it."""
        conv = fold_bn(self.conv, self.bn)
        return nn.Sequential(conv, self.act) if hasattr(self, "act") else conv


def pad_output_channels(conv: nn.Conv2d, multiple: int = 8) -> nn.Conv2d:
    """The same conv with its outputs padded by zero filters to a multiple of ``multiple``; the caller slices the
    extra channels off. A 1×1 classifier to 152 channels runs about 1.6× faster here than to ADE20K's 150, as
    BLAS/oneDNN tile the outputs by 8 or 16 (SegFormer-B0's 150-class classifier at 1/4: 16 → 10 ms)."""
    if conv.groups != 1:
        raise ValueError("only an ungrouped conv can pad its outputs")
    padded = -(-conv.out_channels // multiple) * multiple
    out = nn.Conv2d(conv.in_channels, padded, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=True).to(conv.weight)
    with torch.no_grad():
        out.weight.zero_()
        out.weight[: conv.out_channels].copy_(conv.weight)
        out.bias.zero_()
        if conv.bias is not None:
            out.bias[: conv.out_channels].copy_(conv.bias)
    return out


class HSigmoid(nn.Module):
    """Hard sigmoid ``ReLU6(x + 3) / 6`` (TopFormer's gate, MobileNetV3's h-sigmoid)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample during training, rescaling survivors."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def fuse_modules(module: nn.Module) -> nn.Module:
    """Replace, depth first, every child that has ``fuse()`` by its fused form; drop Dropout/DropPath; LayerNorms
    become :class:`NativeLayerNorm`.

    Used by each family's ``fuse()``: blocks know how to fold themselves, this walks the tree.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Dropout, nn.Dropout2d, DropPath)):
            setattr(module, name, nn.Identity())
        elif type(child) is nn.LayerNorm:
            setattr(module, name, NativeLayerNorm.from_layer_norm(child))
        elif hasattr(child, "fuse") and callable(child.fuse):
            setattr(module, name, child.fuse())
        else:
            fuse_modules(child)
    return module


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize with ``align_corners=False``, the convention of every official model here."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A model's native logits (B, K, h, w) (1/8 for TopFormer, 1/4 for SegFormer) → (B, K, H, W) at the input
    size, bilinear with ``align_corners=False``, as mmseg's ``EncoderDecoder.encode_decode`` does at test time."""
    return resize(logits, tuple(size))


def check_overrides(cls: type, overrides: dict[str, Any], family: str, allowed: Sequence[str]) -> None:
    """Builder overrides checked by name (a variant fixes the rest of ``cls``'s arguments) and against ``cls``'s
    constructor annotations, before it runs: ``--arg head_depthwise=maybe`` would otherwise be a truthy string,
    ``head_channels=abc`` a failure deep in a layer."""
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {family} override(s) {unknown}; allowed: {', '.join(allowed)}")
    hints = typing.get_type_hints(cls.__init__)
    for key, value in overrides.items():
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            expected = hint.__name__ if isinstance(hint, type) else \
                str(hint).replace("typing.", "").replace("collections.abc.", "")
            raise ValueError(f"{family} override {key}={value!r}: expected {expected}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):  # an int is a fine float; a bool is neither
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (Sequence, list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, h) for v, h in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    return True  # anything else the constructor checks itself
