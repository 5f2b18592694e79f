"""Dynamic Gated Linear (DGL) layers: per-image neuron pruning for any family (Nair, Bai, Mao, DynaSegFormer,
ICASSP 2022, arXiv 2111.09499). ``dynasegformer.py`` wires them into SegFormer, ``topformer.py`` into TopFormer's
semantics extractor.

Read top to bottom, in the paper's order:

1. ``GatePredictor`` — one gate vector per image: ``X̂ = LN(AvgPool(X))``, ``G = MLP(X̂ · W1)``; the gated layer's
   own first weight ``W1`` takes part.
2. ``top_r`` — ``M = Top-r(G)``: keep the largest ``1 − s`` fraction of ``G`` *with their values*, zero the rest.
3. ``DynamicGate`` (a site's gate: predictor + Top-r) and ``DynamicGatedLinear`` (DGL) — a linear pair
   ``Z = φ(X (W1 ∘ M)) (W2 ∘ Mᵀ)``: a pruned neuron is neither computed (its row of ``W1``) nor consumed (its
   column of ``W2``).
4. ``SparsitySchedule`` (``s_t = s · min(1, t / T)``) and ``gate_l1`` (``Σ ‖G‖₁`` over every DGL layer).
5. The inference form: per-image gathers of the kept weights, folded gates, native plans.

How the value of ``M`` enters: the paper writes ``Y = X (W1 ∘ M)`` and ``Z = Y (W2 ∘ Mᵀ)``. We apply the kept gate
*values* once, on ``Y`` (the bias is treated as a row of ``W1`` on a constant input, so it is scaled too and a gated
neuron is exactly ``m · (x·w + b)``), and use ``Mᵀ`` on ``W2`` as the *support*: which columns are consumed. Applying
the values on both sides would square them (``m²`` for a linear pair) and couple the two uses; the support on ``W2`` is
what makes a pruned neuron vanish even when ``φ(0) ≠ 0`` (Mix-FFN's depthwise conv has a bias).

The gate's last layer starts at weight 0, bias 1, so a fresh gate outputs ``G ≡ 1``: at sparsity 0 a DGL computes
exactly its dense layer, and a student built from a dense teacher starts as the teacher.

Two execution forms of one function. In float64 they agree to rounding (~1e-14). In float32 each, the masked one
included, carries its own rounding: ≤ 1e-5 apart at the library's initialisation; with non-trivial weights and
gates, up to ~5e-5 from the float64 result and ~4e-5 apart for DynaSegFormer-B0 (logits ~6), and up to ~5e-4 for
a dynamic TopFormer-Tiny, whose attention is unscaled (logits 12–27):

- training (and ``gather=False``): masked dense computation, ``Y = (X W1ᵀ + b) · M``; gradients reach the gate
  through the kept values;
- inference (eval mode): ``plan()`` gathers, per image, the kept rows of ``W1`` and columns of ``W2`` (the gate value
  is multiplied into whichever gathered weight is smallest where a linear map lies in between), then the narrower
  products run, so executed MACs and wall-clock time drop. Only a sort (Top-r) and index gathers are added — no
  Python branching on tensor values, so the graph exports to ONNX (TopK + Gather).

``fuse()`` prepares the inference form further (:func:`fold_gates`): each gate predictor becomes one frozen matrix
product, and the gathered widths are padded with zero neurons to multiples of 8, which CPU kernels run faster than
the exact pruned widths (the padding is exact: a padding slot's gate value is 0). A fused site (SegFormer's,
TopFormer's, a plain DGL) then plans (gate, top-r, gathers) in one call of a small C kernel where one can be built
(:mod:`.native`; PyTorch otherwise, or with :func:`set_native`): in PyTorch, about 15 small operators per site
cost more than half of what 30 % sparsity saves on B0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .native import NativePlan, Part, Selection

# --------------------------------------------------------------------------------------------------------------
# 1. Gate predictor
# --------------------------------------------------------------------------------------------------------------


class GatePredictor(nn.Module):
    """``G = MLP(LN(AvgPool(X)) · W1)`` — the instance-wise importance of each gated neuron, shape (B, n).

    Called with the token average ``AvgPool(X)`` (B, C) — pooled once by the caller and shared by every gate that
    reads the same ``X`` — and the gated layer's first weight(s) ``W1`` (the paper feeds ``X̂ W1`` to the MLP, so
    the gate always sees the layer's current weights). ``rows`` picks, per weight, the output rows that belong to
    ``W1`` (e.g. the K half of SegFormer's fused ``kv`` Linear); the projections are concatenated. The MLP is small
    (``n_proj → hidden → n``) and runs once per image, so its cost is negligible next to the ``N``-token products
    it prunes.
    """

    def __init__(self, in_features: int, gated_features: int, proj_features: int | None = None,
                 hidden_features: int | None = None) -> None:
        super().__init__()
        proj_features = proj_features or gated_features
        hidden_features = hidden_features or default_gate_hidden(gated_features)
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(proj_features, hidden_features)
        # ReLU (applied in forward), not GELU: on a (B, hidden) vector the erf kernel opens a parallel region,
        # which on a busy CPU can stall for milliseconds; the paper does not name the activation.
        self.fc2 = nn.Linear(hidden_features, gated_features)
        # G ≡ 1 at initialisation: the layer starts as its dense self (see module docstring).
        nn.init.zeros_(self.fc2.weight)
        nn.init.ones_(self.fc2.bias)

    def forward(self, pooled: Tensor, weights: Sequence[Tensor],
                rows: Sequence[tuple[int, int] | None]) -> Tensor:
        """``pooled``: (B, C); ``weights[i]``: (n_i, C) or (n_i, C, 1, 1), of which ``rows[i]`` (all if None).
        Returns (B, n)."""
        # Functional calls on the submodules' parameters: this runs on one vector per image, 24 times per B0
        # forward, where nn.Module call overhead is a visible share of the cost.
        norm = self.norm
        x_hat = F.layer_norm(pooled, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        proj = [F.linear(x_hat, _rows(w, r)) for w, r in zip(weights, rows)]
        proj = proj[0] if len(proj) == 1 else torch.cat(proj, dim=1)
        return F.linear(F.relu(F.linear(proj, self.fc1.weight, self.fc1.bias)), self.fc2.weight, self.fc2.bias)

    @torch.no_grad()
    def fold(self, weights: Sequence[Tensor], rows: Sequence[tuple[int, int] | None]) -> FoldedGate:
        """This predictor with its weights frozen: LN affine, ``W1`` and ``fc1`` are one (hidden × C) matrix.

        ``fc1(γ ⊙ n̂ + β) W1ᵀ`` is linear in the normalised pool ``n̂``, so at inference three products and a
        concatenation become one; exact up to float rounding.
        """
        w = torch.cat([_rows(w, r) for w, r in zip(weights, rows)])  # (proj, C)
        a = self.fc1.weight @ w  # (hidden, C)
        norm = self.norm
        return FoldedGate(a * norm.weight, a @ norm.bias + self.fc1.bias, self.fc2.weight.clone(),
                          self.fc2.bias.clone(), norm.eps)


def _rows(weight: Tensor, rows: tuple[int, int] | None) -> Tensor:
    """``W1``'s rows of a layer weight, as (n, C): a Linear's weight, or a 1×1 conv's (n, C, 1, 1) flattened here so
    callers pass parameters, not views of them (a no-grad view of a parameter breaks module-tracking hooks)."""
    weight = weight.flatten(1)
    return weight if rows is None else weight[rows[0]:rows[1]]


class FoldedGate(nn.Module):
    """Inference form of one or more gate predictors: ``G = W₂ ReLU(W₁ LN(x̄) + b₁) + b₂`` (LN without affine).

    :meth:`stack` joins predictors that read the same pooled tokens (attention's Q/K and V gates) into one: first
    layers stacked, second layers block-diagonal, so the pair costs the ops of one gate. Frozen tensors are
    non-persistent buffers: a fused model is built from a checkpoint, never saved as one.
    """

    def __init__(self, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, eps: float) -> None:
        super().__init__()
        for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
            self.register_buffer(name, t.detach().contiguous(), persistent=False)
        self.eps = eps

    @classmethod
    def stack(cls, gates: Sequence[FoldedGate]) -> FoldedGate:
        """One gate whose output is the concatenation of ``gates``' outputs (same input, same LN eps)."""
        if len({g.eps for g in gates}) != 1:
            raise ValueError("stacked gates must share the LayerNorm eps")
        return cls(torch.cat([g.w1 for g in gates]), torch.cat([g.b1 for g in gates]),
                   torch.block_diag(*[g.w2 for g in gates]), torch.cat([g.b2 for g in gates]), gates[0].eps)

    def forward(self, pooled: Tensor) -> Tensor:
        x_hat = F.layer_norm(pooled, pooled.shape[-1:], eps=self.eps)
        return F.linear(F.relu(F.linear(x_hat, self.w1, self.b1)), self.w2, self.b2)


def default_gate_hidden(gated_features: int) -> int:
    """Hidden width of a gate MLP: n/32, at least 16. The paper only says the predictor is lightweight; at n/32 the
    gates add ≈ 8 % parameters to SegFormer-B0 and their MACs are per image, not per token."""
    return max(16, gated_features // 32)


def avg_pool_tokens(x: Tensor) -> Tensor:
    """``AvgPool`` over the tokens: (B, N, C) → (B, C)."""
    return x.mean(dim=1)


# --------------------------------------------------------------------------------------------------------------
# 2. Top-r selection
# --------------------------------------------------------------------------------------------------------------


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float, refused outside [0, 1): at 1 no neuron would be kept."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def keep_count(features: int, sparsity: float) -> int:
    """Neurons kept out of ``features`` at ``sparsity`` s: ``round((1 − s) · n)``, at least 1."""
    return max(1, min(features, math.floor(features * (1.0 - check_sparsity(sparsity)) + 0.5)))


def top_r(gate: Tensor, keep: int, groups: int = 1, width: int | None = None) -> tuple[Tensor, Tensor]:
    """``Top-r(G)``: the ``keep`` largest entries of each of ``groups`` equal slices of ``gate`` (B, n).

    Returns ``(values, index)``, both (B, groups·width), group-major, ``index`` into the full ``n`` axis (by
    descending value within a group). Per-group selection keeps every attention head equally wide, so batched
    per-head products stay rectangular. Of equal values the lower index ranks first (a stable sort; ONNX's TopK and
    the native kernel break ties the same way): a fresh gate predicts 1 for every neuron, and every form of the
    model — masked, gathered, padded, native, exported — must still keep the same ones.

    ``width`` > ``keep`` (the fused inference form, see :func:`slot_support`) returns ``width`` slots per group: the
    top ``keep`` with their values, then the next entries with value 0 — zero neurons that round the gathered widths
    up to what CPU kernels run fastest, without changing the output.
    """
    b, n = gate.shape
    per_group = n // groups
    width = keep if width is None else width
    grouped = gate.reshape(b, groups, per_group)
    # The ONNX exporters have no stable sort; ONNX's TopK ranks ties the same way (checked only while exporting:
    # the ONNX check costs tens of microseconds).
    if (torch.jit.is_tracing() or torch.compiler.is_exporting()) and torch.onnx.is_in_onnx_export():
        values, index = grouped.topk(width, dim=-1)
    else:
        values, index = grouped.sort(dim=-1, descending=True, stable=True)
        values, index = values[..., :width], index[..., :width]
    if groups > 1:
        index = index + torch.arange(0, n, per_group, device=gate.device).reshape(1, groups, 1)
    values, index = values.reshape(b, groups * width), index.reshape(b, groups * width)
    if width > keep:
        values = values * slot_support(keep, width, groups, values)
    return values, index


def slot_support(keep: int, width: int, groups: int, like: Tensor) -> Tensor:
    """(groups·width,) ones for the ``keep`` real slots of each group, zeros for its padding slots.

    Why padding pays: oneDNN/ATen kernels vectorise over 8 floats, and a 22-channel attention head or a 90-channel
    hidden layer runs *slower* than a 24- or 96-wide one (measured on this CPU: the 30 % B0 Mix-FFN at 1/4 is 4.8 ms
    at 90 channels, 3.2 ms at 96, 4.5 ms dense at 128). Each site makes a padding slot contribute exactly 0.
    The tensor is built once per shape, dtype and device (every site asks for it at every forward).
    """
    return _slot_support(keep, width, groups, like.dtype, like.device)


@functools.lru_cache(maxsize=256)
def _slot_support(keep: int, width: int, groups: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # a cached inference tensor would break a later forward with autograd on
        return (torch.arange(width, device=device) < keep).to(dtype).repeat(groups)


def scatter_mask(values: Tensor, index: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Dense ``M`` (B, n) with the kept values (zeros elsewhere) and its 0/1 support (B, n)."""
    zeros = values.new_zeros(values.shape[0], n)
    return zeros.scatter(1, index, values), zeros.scatter(1, index, torch.ones_like(values))


# --------------------------------------------------------------------------------------------------------------
# 3. Dynamic gated linear layer
# --------------------------------------------------------------------------------------------------------------


class DynamicGate(nn.Module):
    """State every gated site shares: the predictor, the current sparsity, the execution form and the last gate.

    ``sparsity`` is the *current* value (the trainer anneals it with :class:`SparsitySchedule`); ``groups`` splits
    the gated axis into equal slices that each keep the same count (attention heads); ``rows`` says which output
    rows of each weight passed at call time form ``W1``. ``gather`` selects the inference form in eval mode;
    training always runs the masked dense form; ``native`` lets a fused site plan in C (:func:`set_native`).
    ``last_gate`` keeps ``G`` of the latest training forward for the L1 penalty (:func:`gate_l1`).
    """

    def __init__(self, in_features: int, gated_features: int, sparsity: float = 0.0, groups: int = 1,
                 rows: Sequence[tuple[int, int] | None] = (None,), hidden_features: int | None = None) -> None:
        super().__init__()
        if gated_features % groups:
            raise ValueError(f"{gated_features} gated neurons do not split into {groups} equal groups")
        proj = sum(gated_features if r is None else r[1] - r[0] for r in rows)
        self.predictor = GatePredictor(in_features, gated_features, proj, hidden_features)
        self.gated_features = gated_features
        self.groups = groups
        self.rows = tuple(rows)
        self.sparsity = check_sparsity(sparsity)
        self.pad_multiple = 1
        self.gather = True
        self.native = True
        self.native_plans: dict[tuple, NativePlan] = {}  # by kept and padded widths; see native_plan
        self._recent: tuple[tuple, NativePlan | None] | None = None  # see recent_plan
        self.last_gate: Tensor | None = None
        self.folded: FoldedGate | None = None
        self.register_buffer("consumer_t", None, persistent=False)

    @property
    def keep(self) -> int:
        """Kept neurons per group at the current sparsity."""
        return keep_count(self.gated_features // self.groups, self.sparsity)

    @property
    def width(self) -> int:
        """Gathered slots per group: ``keep`` rounded up to ``pad_multiple`` (set by ``fuse()``), the extra slots
        zero neurons (:func:`slot_support`); the masked form never pads."""
        keep, m = self.keep, self.pad_multiple
        if not self.gathered or m <= 1:
            return keep
        return min(self.gated_features // self.groups, -(-keep // m) * m)

    def support(self, like: Tensor) -> Tensor | None:
        """1 for real slots, 0 for padding slots, (groups·width,); None when nothing is padded."""
        keep, width = self.keep, self.width
        return None if width == keep else slot_support(keep, width, self.groups, like)

    def fold(self, *weights: Tensor, consumer: Tensor | None = None) -> None:
        """Freeze the predictor with the layer's current ``W1`` (:meth:`GatePredictor.fold`) for inference.

        ``consumer`` (``W2``, (C', n)) is kept transposed: gathering rows of a contiguous (n, C') tensor runs 2–6×
        faster than gathering columns (:meth:`consumer_weight`)."""
        self.folded = self.predictor.fold(weights, self.rows)
        self.forget_plans()
        if consumer is not None:
            self.consumer_t = consumer.detach().t().contiguous()

    def native_plan(self, key: tuple, build: Callable[[], NativePlan]) -> NativePlan | None:
        """The site's native plan (:mod:`.native`) for ``key`` (its kept and padded widths), built by ``build``
        on first use and cached here; None before :meth:`fold` or where no kernel can be built."""
        if self.folded is None or not native.available():
            return None
        plan = self.native_plans.get(key)
        if plan is None:
            plan = self.native_plans[key] = build()
        return plan

    def forget_plans(self) -> None:
        """Drop the native plans: they hold the site's tensors themselves (the weights, the folded gate), which a
        conversion (``.to``, ``.float``, ``.double`` …) or a ``load_state_dict(assign=True)`` replaces; the next
        forward builds them anew from the current ones."""
        self.native_plans = {}
        self._recent = None

    def _apply(self, fn, recurse=True):  # every conversion of the model, or of any module holding this gate
        self.forget_plans()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # every load into the model or a module holding it
        self.forget_plans()
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def plan_state(self) -> tuple[float, int]:
        """What this gate's part of a site's plan depends on, as :meth:`recent_plan` compares it."""
        return self.sparsity, self.pad_multiple

    def recent_plan(self, state: tuple, resolve: Callable[[], NativePlan | None]) -> NativePlan | None:
        """The site's native plan, resolved by ``resolve`` (its checks, then :meth:`native_plan`) only when
        ``state`` — the sparsities and padding the site's plan depends on — differs from the last call's.

        Resolving costs ~30 µs of Python per site inside a real forward, where the interpreter meets cold caches
        (0.5 ms of a DynaSegFormer-B0 forward at 512², 16 sites); comparing a tuple of numbers costs next to none."""
        recent = self._recent
        if recent is None or recent[0] != state:
            recent = self._recent = (state, resolve())
        return recent[1]

    def consumer_weight(self, weight: Tensor) -> Tensor:
        """``W2`` (C', n) to gather columns from: the transposed copy ``fold`` kept, as a view, else ``weight``."""
        return weight if self.consumer_t is None or self.training else self.consumer_t.t()

    @property
    def gathered(self) -> bool:
        """Whether this forward runs the gathered inference form."""
        return self.gather and not self.training

    def forward(self, pooled: Tensor, *weights: Tensor) -> tuple[Tensor, Tensor]:
        """Gate logits from the pooled tokens (B, C) and the weights holding ``W1``; returns ``Top-r(G)`` as
        ``(values, index)``, each (B, groups · width)."""
        if self.folded is not None and not self.training:
            gate = self.folded(pooled)
        else:
            gate = self.predictor(pooled, weights, self.rows)
        self.last_gate = gate if self.training else None
        return top_r(gate, self.keep, self.groups, self.width)

    def __getstate__(self) -> dict:
        # ``last_gate`` is a graph tensor of the last training step: not state, and deepcopy (fuse) cannot copy it.
        # The native plans hold this module's tensors: a copy (deepcopy, pickle) builds its own from its own.
        return {**self.__dict__, "last_gate": None, "native_plans": {}, "_recent": None}

    def extra_repr(self) -> str:
        extra = f", pad_multiple={self.pad_multiple}" if self.pad_multiple > 1 else ""
        extra += ", folded" if self.folded is not None else ""
        return f"gated={self.gated_features}, groups={self.groups}, sparsity={self.sparsity}{extra}"


class DynamicGatedLinear(nn.Module):
    """DGL: ``Z = φ(X (W1 ∘ M)) (W2 ∘ Mᵀ)`` on tokens (B, N, C) → (B, N, C').

    ``fc1`` (C → n) and ``fc2`` (n → C') keep the names of the dense pair they replace, so a dense state dict
    loads unchanged (only ``gate.*`` is new). ``φ`` is any element-wise activation.

    The paper's layer in its plain form, for any family's plain Linear pairs, and the reference the tests hold every
    specialised site to. The sites in the models specialise it because their pairs are not plain: SegFormer's
    attention gates fused projections (``kv``) with attention between W1 and W2, Mix-FFN and TopFormer's MLP have
    a depthwise conv between W1 and φ, and TopFormer's layers are 1×1 convs with BN.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 act: type[nn.Module] = nn.GELU, sparsity: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.gate = DynamicGate(in_features, hidden_features, sparsity)

    @classmethod
    def from_dense(cls, fc1: nn.Linear, fc2: nn.Linear, act: type[nn.Module] = nn.GELU,
                   sparsity: float = 0.0) -> DynamicGatedLinear:
        """A DGL computing ``fc2(φ(fc1(x)))`` at sparsity 0, with a new gate."""
        layer = cls(fc1.in_features, fc1.out_features, fc2.out_features, act, sparsity, bias=fc1.bias is not None)
        layer.fc1.load_state_dict(fc1.state_dict())
        layer.fc2.load_state_dict(fc2.state_dict())
        return layer.to(fc1.weight.device)

    def plan(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Gate and gathers of the inference form: the kept rows of ``fc1`` (scaled) and columns of ``fc2``."""
        if self.gate.native and self.fc1.bias is not None and native.usable(x):
            planned = self.gate.recent_plan(self.gate.plan_state, lambda: native_site_plan(
                self.gate, lambda: [[(self.fc1.weight, "value")], [(self.fc1.bias, "value")],
                                    [(self.gate.consumer_t, "support")]], lambda: _linear_views))
            if planned is not None:
                return planned(x)[0]
        values, index = self.gate(avg_pool_tokens(x), self.fc1.weight)
        w1, b1 = gather_rows(self.fc1.weight, self.fc1.bias, index, values)
        w2 = gather_columns(self.gate.consumer_weight(self.fc2.weight), index)
        support = self.gate.support(w2)
        if support is not None:  # a padding slot computes φ(0), which need not be 0: fc2 must not read it
            w2 = (w2.reshape(w2.shape[0], -1, support.shape[0]) * support).flatten(1)
        return w1, b1, w2

    def fold_gates(self) -> None:
        """Freeze the gate for inference (:meth:`DynamicGate.fold`)."""
        self.gate.fold(self.fc1.weight, consumer=self.fc2.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate.gathered:
            w1, b1, w2 = self.plan(x)
            return consume_gathered(self.act(gathered_linear(x, w1, b1)), w2, self.fc2.bias)
        values, index = self.gate(avg_pool_tokens(x), self.fc1.weight)
        m, support = scatter_mask(values, index, self.fc1.out_features)
        y = self.fc1(x) * m.unsqueeze(1)
        return self.fc2(self.act(y) * support.unsqueeze(1))


def load_dense(gated: nn.Module, dense: nn.Module, what: str) -> None:
    """Copy a dense layer's (or model's) weights into its gated form, key for key. Only the gates' own tensors
    (``*.predictor.*``, new) may be missing: anything else missing or left over means the two do not correspond,
    which a plain ``strict=False`` load would pass in silence."""
    result = gated.load_state_dict(dense.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if ".predictor." not in f".{k}"]
    if missing or result.unexpected_keys:
        raise ValueError(f"the dense weights do not fit {what}: missing {missing}, unexpected {result.unexpected_keys}")


# --------------------------------------------------------------------------------------------------------------
# 4. Sparsity annealing and the gate penalty
# --------------------------------------------------------------------------------------------------------------


class SparsitySchedule:
    """``s_t = s · min(1, t / T)``: prune nothing at first, reach the target after ``T`` steps (paper, Sec. 2.2)."""

    def __init__(self, target: float, anneal_steps: int) -> None:
        self.target = check_sparsity(target)
        self.anneal_steps = int(anneal_steps)

    def __call__(self, step: int) -> float:
        if self.anneal_steps <= 0:
            return self.target
        return self.target * min(1.0, step / self.anneal_steps)


def dynamic_gates(model: nn.Module) -> Iterator[DynamicGate]:
    """Every ``DynamicGate`` of ``model`` (an attention site owns two: Q/K and V)."""
    return (m for m in model.modules() if isinstance(m, DynamicGate))


def set_sparsity(model: nn.Module, sparsity: float) -> None:
    """Set the current sparsity of every DGL site (the annealing step calls this)."""
    sparsity = check_sparsity(sparsity)
    for gate in dynamic_gates(model):
        gate.sparsity = sparsity


def gate_l1(model: nn.Module) -> Tensor:
    """``Σ_layers ‖G‖₁`` of the latest training forward, averaged over the images of the batch."""
    terms = [g.last_gate.abs().sum(dim=1).mean() for g in dynamic_gates(model) if g.last_gate is not None]
    if not terms:
        raise RuntimeError("gate_l1 needs a training-mode forward of a model with DGL layers first")
    return torch.stack(terms).sum()


# --------------------------------------------------------------------------------------------------------------
# 5. Inference form: gathers, folded gates, native plans
# --------------------------------------------------------------------------------------------------------------


def gather_rows(weight: Tensor, bias: Tensor | None, index: Tensor,
                values: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The kept rows of ``W1`` (n, C) and its bias for every image, scaled by their gate values: ``W1 ∘ M`` without
    its zero rows, as ((B·k, C), (B·k,)). Scaling the k·C gathered weights costs less than scaling the (N, k)
    output."""
    flat = index.reshape(-1)
    w = weight.index_select(0, flat)
    b = bias.index_select(0, flat) if bias is not None else None
    if values is not None:
        w = w * values.reshape(-1, 1)
        b = b * values.reshape(-1) if b is not None else None
    return w, b


def gather_columns(weight: Tensor, index: Tensor) -> Tensor:
    """The kept columns of ``W2`` (C', n) for every image: ``W2 ∘ Mᵀ`` without its zero columns, (C', B·k).
    A transposed view of a contiguous (n, C') tensor (:meth:`DynamicGate.consumer_weight`) is gathered by rows."""
    if weight.t().is_contiguous() and not weight.is_contiguous():
        return weight.t().index_select(0, index.reshape(-1)).t()
    return weight.index_select(1, index.reshape(-1))


def gathered_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``X (W1 ∘ M)`` with gathered rows ``weight`` (B·k, C): (B, N, C) → (B, N, k), each image its own rows.

    One image (the usual case on a device) runs a plain Linear with the gathered weight — the dense layer's kernel,
    narrower; a batch runs one batched product. (The branch is on a shape, so exported graphs have no
    value-dependent flow.)
    """
    B = x.shape[0]
    if B == 1:
        return F.linear(x, weight, bias)
    w = weight.reshape(B, -1, weight.shape[-1]).transpose(1, 2)  # (B, C, k)
    return torch.bmm(x, w) if bias is None else torch.baddbmm(bias.reshape(B, 1, -1), x, w)


def consume_gathered(y: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``Y (W2 ∘ Mᵀ)`` with gathered columns ``weight`` (C', B·k): (B, N, k) → (B, N, C')."""
    B = y.shape[0]
    if B == 1:
        return F.linear(y, weight, bias)
    w = weight.reshape(weight.shape[0], B, -1).permute(1, 2, 0)  # (B, k, C')
    return torch.bmm(y, w) if bias is None else torch.baddbmm(bias, y, w)


def gather_hidden(gate: DynamicGate, values: Tensor, index: Tensor, w1: Tensor, b1: Tensor | None,
                  dw_weight: Tensor, dw_bias: Tensor, w2: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor,
                                                                           Tensor]:
    """Gathers of a gated hidden layer ``fc1 → 3×3 depthwise conv → φ → fc2`` (SegFormer's Mix-FFN, TopFormer's
    MLP): kept rows of ``fc1``, their filters (scaled by the gate values) and biases, kept columns of ``fc2``.

    The depthwise conv is linear per channel: ``dw(m · u) + b = (m · dw)(u) + b``, so the gate value scales the 9
    filter taps instead of the C + 1 fc1 weights of each kept neuron. A padding slot's zero filter would still add
    its bias, so that bias is zeroed, and ``φ(0) = 0`` (GELU, ReLU6) leaves the slot empty.
    """
    w1, b1 = gather_rows(w1, b1, index)
    filters, f_bias = gather_rows(dw_weight, dw_bias, index)
    filters = filters * values.reshape(-1, 1, 1, 1)
    support = gate.support(f_bias)
    if support is not None:
        f_bias = (f_bias.reshape(-1, support.shape[0]) * support).flatten()
    # Channels-last strides for the gathered filters, like the map they run on: with NCHW-strided filters
    # oneDNN copies the map to NCHW and runs a ~7× slower depthwise kernel.
    kh, kw = dw_weight.shape[-2:]
    filters = filters.reshape(-1, kh, kw, 1).permute(0, 3, 1, 2)
    return w1, b1, filters, f_bias, gather_columns(gate.consumer_weight(w2), index)


def gathered_hidden(x: Tensor, hw: tuple[int, int], plan: Sequence[Tensor | None], bias2: Tensor | None,
                    act: Callable[[Tensor], Tensor], padding: int = 1) -> Tensor:
    """The gathered hidden layer on tokens (B, N, C) laid out on an ``hw`` grid, with :func:`gather_hidden`'s plan.

    Every image's kept channels sit side by side: one grouped conv (groups = B·k) runs the whole batch.
    """
    w1, b1, filters, f_bias, w2 = plan
    B, N, _ = x.shape
    y = gathered_linear(x, w1, b1)  # (B, N, k)
    k = y.shape[-1]
    y = F.conv2d(y.transpose(1, 2).reshape(1, B * k, *hw), filters, f_bias, padding=padding, groups=B * k)
    return consume_gathered(act(y.reshape(B, k, N).transpose(1, 2)), w2, bias2)


def native_site_plan(gate: DynamicGate, parts: Callable[[], Sequence[Sequence[tuple[Tensor, str]]]],
                     views: Callable[[], Callable[[list[Tensor], int], tuple[Tensor, ...]]]) -> NativePlan | None:
    """The plan of a site with one gate over all its slots as one native call (:meth:`DynamicGate.native_plan`);
    ``parts()``: per gathered tensor, its (source, scale) parts; ``views()``: the buffers' shaping. Both are called
    only when the plan is built, so a forward with the plan cached does no more than a dict lookup."""
    def build() -> NativePlan:
        k = gate.groups * gate.width
        selection = Selection(0, gate.groups, gate.gated_features // gate.groups, gate.keep, gate.width)
        return NativePlan(gate.folded, [selection], [[Part(src, 0, k, scale=scale) for src, scale in out]
                                                     for out in parts()], views())

    return gate.native_plan((gate.keep, gate.width), build)


def native_hidden_plan(gate: DynamicGate, w1: Tensor, b1: Tensor | None, dw_weight: Tensor, dw_bias: Tensor | None,
                       w2: Tensor) -> NativePlan | None:
    """:func:`gather_hidden`'s plan as one native call (:func:`native_site_plan`); ``w2`` (C', n) is only checked
    against the transposed copy the folded gate keeps. None where a layer has no bias."""
    if b1 is None or dw_bias is None or gate.consumer_t is None or gate.consumer_t.shape != w2.t().shape:
        return None
    return native_site_plan(
        gate, lambda: [[(w1, "none")], [(b1, "none")], [(dw_weight, "value")], [(dw_bias, "support")],
                       [(gate.consumer_t, "none")]],
        lambda: functools.partial(_hidden_views, kernel=tuple(dw_weight.shape[-2:])))


def _linear_views(bufs: list[Tensor], batch: int) -> tuple[Tensor, ...]:
    """The native buffers as :meth:`DynamicGatedLinear.plan` returns its plan."""
    w1, b1, w2_t = (b.flatten(0, 1) for b in bufs)
    return w1, b1.view(-1), w2_t.t()


def _hidden_views(bufs: list[Tensor], batch: int, kernel: tuple[int, int]) -> tuple[Tensor, ...]:
    """The native buffers as :func:`gather_hidden` returns its plan (filters with channels-last strides)."""
    w1, b1, taps, f_bias, w2_t = (b.flatten(0, 1) for b in bufs)
    return w1, b1.view(-1), taps.view(-1, *kernel, 1).permute(0, 3, 1, 2), f_bias.view(-1), w2_t.t()


def fold_gates(model: nn.Module, pad_multiple: int = 8) -> nn.Module:
    """Prepare every DGL site of an eval model for fast inference, in place (``fuse()`` calls this).

    Gate predictors are folded with their layers' frozen weights (:meth:`GatePredictor.fold`), and the gathered
    widths are padded with zero neurons up to a multiple of ``pad_multiple`` (:func:`slot_support`). Outputs are
    unchanged but for rounding (see the module docstring); the executed MACs include the padding slots.
    """
    for module in model.modules():
        if not isinstance(module, DynamicGate) and any(isinstance(c, DynamicGate) for c in module.children()):
            module.fold_gates()  # every module owning gates (a DGL site) knows which weights its gates read
    for gate in dynamic_gates(model):
        gate.pad_multiple = int(pad_multiple)
    return model


def set_gather(model: nn.Module, gather: bool) -> None:
    """Choose the eval-mode form: gathered (default, the fast one) or masked dense (the training form)."""
    for gate in dynamic_gates(model):
        gate.gather = gather


def set_native(model: nn.Module, native: bool) -> None:
    """Let fused DGL sites plan (gate, Top-r, gathers) natively (default, where the kernel builds: :mod:`.native`)
    or in PyTorch. Only the plans: the attention, LayerNorm and decoder kernels follow ``EDGESEG_NATIVE`` (and the
    decoder its ``native`` attribute)."""
    for gate in dynamic_gates(model):
        gate.native = native


@torch.no_grad()
def random_gates_(model: nn.Module, seed: int = 0, std: float = 0.5) -> nn.Module:
    """Random last gate layers for measurements on untrained models, in place.

    A fresh gate outputs ``G ≡ 1``: every neuron ties, and Top-r keeps the lowest indices, the same channels for
    every image. Random weights make each image keep its own channels, as a trained gate would.
    """
    gen = torch.Generator().manual_seed(seed)
    for gate in dynamic_gates(model):
        fc2 = gate.predictor.fc2
        fc2.weight.copy_(torch.randn(fc2.weight.shape, generator=gen) * std)
        fc2.bias.copy_(1 + torch.randn(fc2.bias.shape, generator=gen) * 0.1)
    return model
