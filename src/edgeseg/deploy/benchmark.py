"""The one measuring harness: parameter counts, MACs and latency.

Every benchmark script and ``edgeseg info``/``edgeseg bench`` go through these functions, so a number in the README
and a number a user measures mean the same thing.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

MAC_CONVENTION = ("1 MAC = 2 FLOPs, counted by torch.utils.flop_counter on the ops executed: convolutions and "
                  "matrix products (attention products included). 'gmacs' adds what each paper's counter also "
                  "charged per output element (mmcv get_model_complexity_info): TopFormer's conv bias 1, "
                  "BatchNorm 2, ReLU/ReLU6 1; SegFormer's (mmcv 1.2.7, no SyncBN/LayerNorm hooks) conv bias 1, "
                  "ReLU 1. 'gmacs_macs_only' is the MACs alone. Interpolation, GELU and additions are free")

_aten = torch.ops.aten


def _conv_with_bias(x_shape, w_shape, bias, _stride, _padding, _dilation, transposed, *args, out_shape=None,
                    **kwargs) -> int:
    flops = conv_flop_count(x_shape, w_shape, out_shape, transposed=transposed)
    return flops + (2 * math.prod(out_shape) if bias is not None else 0)


def _per_element(macs: int) -> Callable[..., int]:
    def count(*args, out_shape=None, **kwargs) -> int:
        if isinstance(out_shape, (tuple, list)) and isinstance(out_shape[0], (tuple, list, torch.Size)):
            out_shape = out_shape[0]  # an op with several outputs: the first is its result
        return 2 * macs * math.prod(out_shape)

    return count


_BIAS_AND_RELU = {
    _aten.convolution: _conv_with_bias,
    _aten._convolution: _conv_with_bias,
    _aten.relu: _per_element(1),
    _aten.relu_: _per_element(1),
    _aten.hardtanh: _per_element(1),
    _aten.hardtanh_: _per_element(1),
}
_BATCH_NORM = {
    _aten._native_batch_norm_legit_no_training: _per_element(2),
    _aten.native_batch_norm: _per_element(2),
}

# What the counter behind each paper's table charged besides MACs. Both used mmcv's get_model_complexity_info
# (SegFormer adding its attention products, which flop_counter sees anyway), but different mmcv versions: the one
# SegFormer pinned (1.2.7) had no hook for SyncBatchNorm or LayerNorm, so its figures carry conv biases and ReLUs
# only, while TopFormer's figures include BatchNorm. With these charges every published TopFormer-T/S/B and
# SegFormer-B0…B5 figure is reproduced to its last digit.
CONVENTIONS: dict[str, dict | None] = {
    "macs": None,
    "mmcv": {**_BIAS_AND_RELU, **_BATCH_NORM},
    "mmcv-1.2": _BIAS_AND_RELU,
}
PAPER_COUNTER = {"TopFormer": "mmcv", "SegFormer": "mmcv-1.2", "DynaSegFormer": "mmcv-1.2"}


def _resolve_convention(model: nn.Module, convention: str) -> dict | None:
    if convention == "paper":
        from ..models import family_of

        convention = PAPER_COUNTER.get(family_of(model), "macs") if hasattr(model, "model_name") else "macs"
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be 'paper' or one of {', '.join(CONVENTIONS)}, not {convention!r}")
    return CONVENTIONS[convention]


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Exact number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def random_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights and BN statistics, in place, for comparing implementations of one architecture.

    Default inits leave LayerNorms at (1, 0), BN statistics at (0, 1) and biases at 0, which would hide a mistake in
    any of them; scaled weights keep activations in a sane range through deep models.
    """
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if name.endswith("running_var") or (t.ndim == 1 and name.endswith("weight")):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif t.ndim >= 2:
            t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


@torch.no_grad()
def count_gmacs(model: nn.Module, input_size: tuple[int, int] = (512, 512), batch: int = 1,
                forward: Callable[[torch.Tensor], Any] | None = None, convention: str = "paper") -> float:
    """GMACs of one forward pass of ``batch`` images, per image.

    Counted on the ops actually executed, so a dynamic model reports the MACs it really spends.
    ``convention="macs"`` counts only multiply-accumulates of convolutions and matrix products; ``"paper"`` adds
    the element-wise charges of the counter behind the model family's published table (see ``CONVENTIONS``).
    """
    mapping = _resolve_convention(model, convention)
    if forward is None:
        # Shapes are all a count needs: a meta-device copy costs no compute (a big model at 640² is instant).
        try:
            meta = copy.deepcopy(model).eval().to("meta")
            counter = FlopCounterMode(display=False, custom_mapping=mapping)
            with counter:
                meta(torch.empty(batch, 3, *input_size, device="meta"))
            return counter.get_total_flops() / 2 / 1e9 / batch
        except (RuntimeError, NotImplementedError):  # an op without a meta kernel: count on the CPU instead
            pass
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        (forward or model)(torch.randn(batch, 3, *input_size))
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9 / batch


@dataclass
class BenchResult:
    """Latency statistics of one configuration (all times in milliseconds)."""

    model: str
    input_size: list[int]
    batch: int
    threads: int
    fused: bool
    latency_ms_median: float
    latency_ms_p90: float
    images_per_s: float
    runs: int
    gmacs: float | None = None
    extra: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    idx = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[idx]


@torch.inference_mode()
def time_forward(fn: Callable[[], Any], warmup: int = 5, min_runs: int = 10, max_runs: int = 200,
                 min_seconds: float = 2.0) -> list[float]:
    """Run ``fn`` after a warm-up until both ``min_runs`` and ``min_seconds`` are reached; return ms per run."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def compare_latency(fns: dict[str, Callable[[], Any]], rounds: int = 15, warmup: int = 3) -> dict[str, list[float]]:
    """Time several callables alternately (A, B, A, B, ...) so machine noise hits all of them alike.

    Ratios of the medians are what benchmarks quote: on a shared, noisy machine only same-run ratios are stable.
    """
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def benchmark(model: nn.Module, input_size: tuple[int, int] = (512, 512), batch: int = 1, threads: int | None = None,
              fuse: bool = False, min_seconds: float = 2.0, name: str | None = None,
              with_gmacs: bool = True) -> BenchResult:
    """Median / p90 latency of ``model`` on random input in eval mode (optionally fused first)."""
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = model.eval()
        if fuse:
            model = model.fuse()
        x = torch.randn(batch, 3, *input_size)
        times = time_forward(lambda: model(x), min_seconds=min_seconds)
        med = statistics.median(times)
        return BenchResult(
            model=name or getattr(model, "model_name", type(model).__name__),
            input_size=list(input_size), batch=batch, threads=torch.get_num_threads(), fused=fuse,
            latency_ms_median=round(med, 3), latency_ms_p90=round(_percentile(times, 0.9), 3),
            images_per_s=round(batch * 1e3 / med, 2), runs=len(times),
            gmacs=round(count_gmacs(model, input_size), 4) if with_gmacs else None,
        )
    finally:
        torch.set_num_threads(prev_threads)
