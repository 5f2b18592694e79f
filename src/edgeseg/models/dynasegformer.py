"""DynaSegFormer: dynamically pruned SegFormer (Nair, Bai, Mao, ICASSP 2022, arXiv 2111.09499).

SegFormer whose attention Q/K/V and Mix-FFN hidden layers are Dynamic Gated Linear layers (:mod:`.dynamic`: the
gate predictor, Top-r, the schedule and the inference form), with a decoder that adds the projected stage maps
instead of concatenating them. Read top to bottom:

1. DGL in SegFormer's MiT blocks: ``DynamicEfficientSelfAttention`` (Q/K and V) and ``DynamicMixFFN`` (hidden layer).
2. ``DynaSegFormer`` (additive decoder) and ``from_segformer``, the student built from a dense teacher.
3. Paper figures, checkpoint layout, builders ``dynasegformer-b0`` … ``-b5``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import native
from .dynamic import (
    DynamicGate,
    FoldedGate,
    avg_pool_tokens,
    check_sparsity,
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
from .layers import check_overrides, fuse_modules
from .native import NativePlan, Part, Selection
from .segformer import (
    _ENCODER_ARGS,
    EMBED_LN_EPS,
    OFFICIAL_LN_EPS,
    SHARED,
    VARIANTS,
    AdditiveMLPDecoder,
    EfficientSelfAttention,
    MixFFN,
    MixVisionTransformer,
    MMSegMLPDecoder,
    SegFormer,
    _jsonable,
)
from .segformer import INPUT_SIZES as SEGFORMER_INPUT_SIZES
from .segformer import infer_model as segformer_infer_model

# --------------------------------------------------------------------------------------------------------------
# 1. DGL inside SegFormer's MiT blocks
# --------------------------------------------------------------------------------------------------------------


class DynamicEfficientSelfAttention(EfficientSelfAttention):
    """Efficient self-attention with DGL on Q, K and V (paper: "DGL is applied to Q, K, V of the MiT encoder").

    Two gated pairs, each ``W1 → W2``:

    - **Q/K — one shared mask.** In ``softmax(Q Kᵀ · scale)`` channel c of Q meets only channel c of K, so a
      channel pruned from Q alone would still be computed in K for nothing; one mask ``M_qk`` prunes the same
      channels from both (``W1`` = rows of ``W_q`` and ``W_k``; the "``W2``" that consumes them is the ``Q Kᵀ``
      product itself, which then runs over the kept channels only). The gate reads ``X̂ · [W_q; W_k]``. Its kept
      values scale Q (once): the logit is ``Σ_c m_c q_c k_c``.
    - **V → output projection.** ``M_v`` prunes channels of V (``W1`` = ``W_v``) and the matching columns of
      ``proj`` (``W2``): attention is linear in V, so a pruned V channel is an all-zero channel of the attention
      output that ``proj`` need not read.

    Heads: both masks keep the same number of channels *in every head* (``top_r`` per head). Heads then stay equally
    wide, so Q, K, V remain (B, heads, tokens, k) tensors and the two attention products stay single batched
    matmuls; a global top-k would give heads different widths (ragged, one product per head) and could empty a
    head, which would turn its softmax into a uniform average. The scale stays the dense ``head_dim^-0.5`` the
    weights were trained with. The gates read the attention input ``X`` (before sequence reduction).

    Padded (``fuse()``): the products run each head at the padded width, the extra slots zero K and V channels; the
    scores then read only the kept Q/K channels, which come first in every head — the native attention's time falls
    with each channel (2–3 % of it at 22 of 24). V keeps the padded width: the kernel's value channels past the last
    group of eight run one at a time, and 22 of them took 1.2× the time of 24.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_eps: float = EMBED_LN_EPS, sparsity: float = 0.0) -> None:
        super().__init__(dim, num_heads, sr_ratio, qkv_bias, attn_drop, proj_drop, norm_eps)
        # W1 of Q/K: all rows of ``q`` and the first C rows of ``kv``; W1 of V: the last C rows of ``kv``.
        self.qk_gate = DynamicGate(dim, dim, sparsity, num_heads, rows=(None, (0, dim)))
        self.v_gate = DynamicGate(dim, dim, sparsity, num_heads, rows=((dim, 2 * dim),))
        self.joint_gate: FoldedGate | None = None

    @classmethod
    def from_dense(cls, attn: EfficientSelfAttention, sparsity: float = 0.0) -> DynamicEfficientSelfAttention:
        """The same attention (weights copied) with new gates."""
        dim = attn.q.in_features
        eps = attn.norm.eps if attn.sr_ratio > 1 else EMBED_LN_EPS
        new = cls(dim, attn.num_heads, attn.sr_ratio, attn.q.bias is not None, _drop_p(attn.attn_drop),
                  _drop_p(attn.proj_drop), eps, sparsity)
        load_dense(new, attn, "a dynamic attention")
        new.fused_attention = attn.fused_attention
        return new.to(attn.q.weight.device)

    def fold_gates(self) -> None:
        """Freeze both gates for inference and join them into one (:class:`FoldedGate`): they read the same pool."""
        self.qk_gate.fold(self.q.weight, self.kv.weight)
        self.v_gate.fold(self.kv.weight, consumer=self.proj.weight)
        self.joint_gate = FoldedGate.stack([self.qk_gate.folded, self.v_gate.folded])

    def native_plan(self) -> NativePlan | None:
        """This site's plan as one native call (:mod:`.native`), for the current kept and padded widths; None
        where it does not apply (gates not folded, unequal Q/K and V sparsities, no bias, no kernel built)."""
        qk, v = self.qk_gate, self.v_gate
        if self.joint_gate is None or qk.keep != v.keep or self.q.bias is None:
            return None

        def build() -> NativePlan:  # slots: [Q/K channels | V channels], per head; V's gate logits follow Q/K's
            C, K = self.q.in_features, self.num_heads * qk.width
            return NativePlan(self.joint_gate, [Selection(0, 2 * self.num_heads, self.head_dim, qk.keep, qk.width)], [
                [Part(self.q.weight, 0, K)], [Part(self.q.bias, 0, K)],
                [Part(self.kv.weight, 0, 2 * K, scale="value")], [Part(self.kv.bias, 0, 2 * K, scale="value")],
                [Part(v.consumer_t, K, K, offset=C)]], _attention_views)

        return qk.native_plan((qk.keep, qk.width), build)  # the joint plan lives on the Q/K gate

    def plan(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor]:
        """Gates and gathers of the inference form: kept rows of ``q``, of ``kv`` (K rows with the same channels,
        then the V rows; both scaled by their gate values) and kept columns of ``proj``.

        The values go on the ``kv`` rows only: ``Σ_c m_c q_c k_c`` is the same logit whether ``m`` scales Q or K, and
        attention is linear in V, so one scaling of the gathered ``kv`` weights and bias serves both gates (the
        masked form scales Q and V). The plan runs per image at every site, where each small op is a visible
        share of the narrowed products, so it is kept to as few ops as possible.
        """
        qk_gate, v_gate = self.qk_gate, self.v_gate
        if qk_gate.native and native.usable(x):
            planned = qk_gate.recent_plan(qk_gate.plan_state + v_gate.plan_state, self.native_plan)
            if planned is not None:
                return planned(x)[0]
        C = x.shape[-1]
        pooled = avg_pool_tokens(x)
        if qk_gate.keep == v_gate.keep:  # Python ints (set_sparsity keeps them equal; a user need not)
            # One Top-r over both gates side by side, ``[G_qk | G_v]`` (B, 2C) in 2·heads groups: the same per-head
            # selections as two calls, and its index is already ``kv``'s row index (K rows < C ≤ V rows).
            if self.joint_gate is not None:  # fused: both predictors folded into one (FoldedGate.stack)
                gate = self.joint_gate(pooled)
            else:
                gate = torch.cat([qk_gate.predictor(pooled, (self.q.weight, self.kv.weight), qk_gate.rows),
                                  v_gate.predictor(pooled, (self.kv.weight,), v_gate.rows)], dim=1)
            # Padding slots (fused form) get value 0 on the kv rows: a zero K channel adds 0 to every logit, a zero
            # V channel is a zero output column — exact.
            kv_values, kv_index = top_r(gate, qk_gate.keep, 2 * self.num_heads, qk_gate.width)
            qk_index, v_index = kv_index.split([kv_index.shape[1] // 2] * 2, dim=1)
            qk_gate.last_gate = v_gate.last_gate = None  # as DynamicGate.forward does outside training
        else:
            qk_values, qk_index = qk_gate(pooled, self.q.weight, self.kv.weight)
            v_values, v_index = v_gate(pooled, self.kv.weight)
            v_index = v_index + C
            kv_values, kv_index = torch.cat([qk_values, v_values], dim=1), torch.cat([qk_index, v_index], dim=1)
        w_q, b_q = gather_rows(self.q.weight, self.q.bias, qk_index)
        # K and V rows of the one ``kv`` Linear gathered together: one product, as in the dense layer.
        w_kv, b_kv = gather_rows(self.kv.weight, self.kv.bias, kv_index, kv_values)
        return w_q, b_q, w_kv, b_kv, gather_columns(v_gate.consumer_weight(self.proj.weight), v_index - C)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return self._forward_gathered(x, hw) if self.qk_gate.gathered else self._forward_masked(x, hw)

    def _forward_masked(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Training form: dense products, Q scaled by the kept Q/K gate values, V by the V values, and ``proj`` fed
        only the kept V channels (the support)."""
        B, N, C = x.shape
        heads = self.num_heads
        pooled = avg_pool_tokens(x)
        qk_values, qk_index = self.qk_gate(pooled, self.q.weight, self.kv.weight)
        v_values, v_index = self.v_gate(pooled, self.kv.weight)
        m_qk, _ = scatter_mask(qk_values, qk_index, C)
        m_v, support_v = scatter_mask(v_values, v_index, C)
        q = (self.q(x) * m_qk.unsqueeze(1)).reshape(B, N, heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(self.reduce(x, hw)).reshape(B, -1, 2, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        v = v * m_v.reshape(B, heads, 1, self.head_dim)
        return self.proj_drop(self.proj(self.attend(q, k, v) * support_v.unsqueeze(1)))

    def _forward_gathered(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Inference form: each image's kept rows of ``q`` and ``kv`` and columns of ``proj`` (:meth:`plan`), the
        products and the attention at the kept widths."""
        B, N, _ = x.shape
        heads = self.num_heads
        w_q, b_q, w_kv, b_kv, w_proj = self.plan(x)
        width_qk, width_v = self.qk_gate.width, self.v_gate.width
        q = gathered_linear(x, w_q, b_q).reshape(B, N, heads, width_qk).transpose(1, 2)  # (B, heads, N, ·)
        k, v = gathered_linear(self.reduce(x, hw), w_kv, b_kv).split([heads * width_qk, heads * width_v], dim=-1)
        k = k.reshape(B, -1, heads, width_qk).transpose(1, 2)
        v = v.reshape(B, -1, heads, width_v).transpose(1, 2)
        if self.qk_gate.keep < width_qk:  # padded: the scores read each head's kept channels (the first) only
            q, k = q[..., : self.qk_gate.keep], k[..., : self.qk_gate.keep]
        return self.proj_drop(consume_gathered(self.attend(q, k, v), w_proj, self.proj.bias))


def _attention_views(bufs: list[Tensor], batch: int) -> tuple[Tensor, ...]:
    """The native buffers as :meth:`DynamicEfficientSelfAttention.plan` returns its plan."""
    w_q, b_q, w_kv, b_kv, w_proj_t = (b.flatten(0, 1) for b in bufs)
    return w_q, b_q.view(-1), w_kv, b_kv.view(-1), w_proj_t.t()


class DynamicMixFFN(MixFFN):
    """Mix-FFN with a DGL on its hidden layer: ``fc2(GELU(DWConv(fc1(x) · M)) · supp(M))``.

    The depthwise conv and GELU act per channel, so a pruned hidden channel is skipped by all three of ``fc1``
    (not computed), the conv (its 3×3 filter not applied) and ``fc2`` (not consumed). In the gathered form each
    image's kept filters are stacked into one grouped conv (groups = B·k), so batches of any size run in one call.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, sparsity: float = 0.0) -> None:
        super().__init__(dim, hidden_dim, drop)
        self.gate = DynamicGate(dim, hidden_dim, sparsity)

    @classmethod
    def from_dense(cls, mlp: MixFFN, sparsity: float = 0.0) -> DynamicMixFFN:
        """The same Mix-FFN (weights copied) with a new gate."""
        new = cls(mlp.fc1.in_features, mlp.fc1.out_features, _drop_p(mlp.drop), sparsity)
        load_dense(new, mlp, "a dynamic Mix-FFN")
        return new.to(mlp.fc1.weight.device)

    def plan(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
        """Gate and gathers of the inference form (:func:`gather_hidden`), natively where it can
        (:func:`native_hidden_plan`)."""
        gate = self.gate
        if gate.native and native.usable(x):
            planned = gate.recent_plan(gate.plan_state, lambda: native_hidden_plan(
                gate, self.fc1.weight, self.fc1.bias, self.dwconv.weight, self.dwconv.bias, self.fc2.weight))
            if planned is not None:
                return planned(x)[0]
        values, index = self.gate(avg_pool_tokens(x), self.fc1.weight)
        return gather_hidden(self.gate, values, index, self.fc1.weight, self.fc1.bias, self.dwconv.weight,
                             self.dwconv.bias, self.fc2.weight)

    def fold_gates(self) -> None:
        """Freeze the gate for inference (:meth:`DynamicGate.fold`)."""
        self.gate.fold(self.fc1.weight, consumer=self.fc2.weight)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        B, N, _ = x.shape
        if self.gate.gathered:  # eval only: dropout is the identity
            return gathered_hidden(x, hw, self.plan(x), self.fc2.bias, self.act, self.dwconv.padding)
        values, index = self.gate(avg_pool_tokens(x), self.fc1.weight)
        m, support = scatter_mask(values, index, self.fc1.out_features)
        y = self.fc1(x) * m.unsqueeze(1)
        y = self.dwconv(y.transpose(1, 2).reshape(B, -1, *hw)).flatten(2).transpose(1, 2)
        y = self.drop(self.act(y)) * support.unsqueeze(1)
        return self.drop(self.fc2(y))


def _drop_p(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def make_dynamic(encoder: MixVisionTransformer, sparsity: float) -> MixVisionTransformer:
    """Swap, in place, every block's attention and Mix-FFN for their DGL forms (weights kept, gates new)."""
    for stage in encoder.stages:
        for block in stage.blocks:
            block.attn = DynamicEfficientSelfAttention.from_dense(block.attn, sparsity)
            block.mlp = DynamicMixFFN.from_dense(block.mlp, sparsity)
    return encoder


# --------------------------------------------------------------------------------------------------------------
# 2. The model
# --------------------------------------------------------------------------------------------------------------


class DynaSegFormer(nn.Module):
    """MiT encoder with DGL in every block → additive MLP decoder. (B, 3, H, W) → logits (B, K, H/4, W/4).

    ``sparsity`` is the target fraction of gated neurons pruned per image (every gated site uses it); training
    anneals the current value from 0 (:func:`set_sparsity`). The decoder adds the projected stage maps instead of
    concatenating them (paper Sec. 2.3), which is exactly SegFormer's decoder with its fuse conv folded in.
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        sr_ratios: Sequence[int],
        decoder_dim: int,
        num_classes: int = 150,
        sparsity: float = 0.3,
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        in_channels: int = 3,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        dropout: float = 0.1,
        ln_eps: float = OFFICIAL_LN_EPS,
        embed_ln_eps: float = EMBED_LN_EPS,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.sparsity = check_sparsity(sparsity)
        encoder = MixVisionTransformer(embed_dims, depths, num_heads, sr_ratios, mlp_ratios, in_channels,
                                       drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                       drop_path_rate=drop_path_rate, ln_eps=ln_eps, embed_ln_eps=embed_ln_eps)
        self.encoder = make_dynamic(encoder, sparsity)
        self.decode_head = AdditiveMLPDecoder(embed_dims, decoder_dim, num_classes, batch_norm=True, dropout=dropout)
        self.model_name = "dynasegformer"
        self.model_args: dict = {"num_classes": num_classes, "sparsity": sparsity}

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) → the four encoder maps (B, C_i, H/4 … H/32, W/4 … W/32)."""
        return self.encoder.forward_features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode_head(self.encoder.forward_features(x))

    def fuse(self, pad_multiple: int = 8) -> DynaSegFormer:
        """A new inference model: decoder BN folded, attention by the native kernel or SDPA, dropout/drop-path
        removed, conv weights channels-last (as ``SegFormer.fuse``); the DGL layers run their gathered form in eval
        mode, gates folded and kept widths padded with zero neurons to ``pad_multiple`` (:func:`fold_gates`). Same
        logits up to float32 rounding (see :mod:`.dynamic`)."""
        # gates first, as TopFormer's: they fold the weights they read as trained, before any block folds its own
        fused = fuse_modules(fold_gates(copy.deepcopy(self).eval(), pad_multiple))
        return fused.to(memory_format=torch.channels_last)


@torch.no_grad()
def from_segformer(teacher: SegFormer, sparsity: float = 0.3, **overrides: Any) -> DynaSegFormer:
    """The paper's student: a DynaSegFormer of the teacher's size holding the teacher's weights, gates new.

    Encoder weights are copied key for key; the decoder is the teacher's folded into the additive form
    (:meth:`~.segformer.MLPDecoder.to_additive`). With ``G ≡ 1`` at initialisation, at sparsity 0 the student
    computes the teacher's logits. ``overrides`` change training-only builder kwargs (e.g. ``drop_path_rate``).
    """
    name = getattr(teacher, "model_name", "")
    if not name.startswith("segformer-"):
        raise ValueError(f"the DynaSegFormer teacher must be a SegFormer model (segformer-b0…b5), got '{name}'")
    if isinstance(teacher.decode_head, MMSegMLPDecoder):
        # Its ReLU after each stage's projection comes before the fusion conv: no Σ_i up(Linear_i(c_i)) equals it.
        raise ValueError(f"the DynaSegFormer teacher {name} has mmsegmentation's decode head (decoder='mmseg'), whose "
                         f"per-stage ReLUs do not fold into DynaSegFormer's additive decoder: distil from a SegFormer "
                         f"with the official decoder (an NVlabs or Hugging Face checkpoint, or decoder='official')")
    # "decoder" is a dense SegFormer's argument only; an mmseg decoder was refused above
    args = {k: v for k, v in {**teacher.model_args, **overrides}.items() if k != "decoder"}
    student = MODELS["dyna" + name](sparsity=sparsity, **args)
    student = student.to(next(teacher.parameters()).device)
    load_dense(student.encoder, teacher.encoder, f"{student.model_name}'s encoder")
    student.decode_head = teacher.decode_head.to_additive(fold_bn=False, dropout=args.get("dropout"))
    return student.train(teacher.training)


# --------------------------------------------------------------------------------------------------------------
# 3. Paper figures, checkpoint layout, builders
# --------------------------------------------------------------------------------------------------------------


# Paper (ADE20K, 512×512): B0 8.4 → 3.3 GFLOPs (their "FLOPs" are MACs, as SegFormer's) with 36.9 % mIoU, which
# the paper summary places at 30 %, and 2.7 at 50 %. Not listed: B2's 18.5 GFLOPs (45.4 % mIoU) from the second
# summary, at a sparsity it does not state and beside a dense B2 of 45.8 GFLOPs (SegFormer's paper: 62.4), so no
# count of ours compares to it (README). The paper's parameter counts are not in our sources. ``miou_ade20k`` is
# for readers of this table; nothing compares against it.
PAPER: dict[str, dict] = {
    "dynasegformer-b0": {"params_m": None, "gmacs": 3.3, "input_size": [512, 512], "num_classes": 150,
                         "gmacs_at_sparsity": {"0.3": 3.3, "0.5": 2.7}, "miou_ade20k": 36.9},
}


def convert_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]] | None:
    """DynaSegFormer exists only in edgeseg's layout: claim a state dict iff it holds DGL gates."""
    if any(".qk_gate.predictor." in k or ".mlp.gate.predictor." in k for k in state_dict):
        return dict(state_dict), []
    return None


def infer_model(state_dict: dict[str, Tensor]) -> tuple[str, dict]:
    """Variant and kwargs from tensor shapes, via SegFormer's reader (same encoder, decoder width from linear_c).

    The sparsity leaves no trace in the weights; edgeseg checkpoints carry it in ``model_args``.
    """
    name, args = segformer_infer_model({k: v for k, v in state_dict.items() if ".gate." not in k})
    return "dyna" + name, args


_ARGS = _ENCODER_ARGS + ("decoder_dim", "dropout")  # SegFormer's, less its decoder choice (only the additive one)


def _create(variant: str, num_classes: int, sparsity: float, overrides: dict) -> DynaSegFormer:
    check_overrides(DynaSegFormer, {**overrides, "sparsity": sparsity}, "DynaSegFormer", ("sparsity",) + _ARGS)
    model = DynaSegFormer(num_classes=num_classes, sparsity=sparsity, **{**SHARED, **VARIANTS[variant], **overrides})
    model.model_name = f"dynasegformer-{variant}"
    model.model_args = {"num_classes": num_classes, "sparsity": sparsity,
                        **{k: _jsonable(v) for k, v in overrides.items()}}
    return model


def _builder(variant: str) -> Callable[..., DynaSegFormer]:
    def build(num_classes: int = 150, sparsity: float = 0.3, **overrides: Any) -> DynaSegFormer:
        return _create(variant, num_classes, sparsity, overrides)

    build.__name__ = f"dynasegformer_{variant}"
    build.__doc__ = f"DynaSegFormer-{variant.upper()}: MiT-{variant.upper()} with DGL, additive decoder."
    return build


MODELS: dict[str, Callable[..., DynaSegFormer]] = {f"dynasegformer-{v}": _builder(v) for v in VARIANTS}


# counted, when no size is asked for, at the size of the SegFormer it is distilled from
INPUT_SIZES: dict[str, tuple[int, int]] = {f"dynasegformer-{v}": SEGFORMER_INPUT_SIZES[f"segformer-{v}"]
                                            for v in VARIANTS}
