"""Dynamic (DGL) models vs their dense teachers, latency: 512×512, batch 1, 2 threads, all timed in the same run.

``--model segformer-b0`` (default): DynaSegFormer-B0 vs SegFormer-B0, the DynaSegFormer issue's targets checked;
``--model topformer-tiny`` (or -small, -base): TopFormer with a dynamic semantics extractor vs the dense TopFormer.

Rows (timed alternately by ``compare_latency``, medians, so machine noise hits all of them alike):

- ``published`` — our eager model, which computes exactly what the official code computes (SegFormer: concatenating
  decoder with its 4E → E fuse conv at 1/4 resolution, explicit softmax attention);
- ``transformers`` (SegFormer, when transformers is installed) — Hugging Face's eager
  ``SegformerForSemanticSegmentation`` with the same weights: the published model as its users run it (the official
  mmseg 0.x code no longer installs). The SegFormer issue measured "published" with it (about 320 ms → 120 ms
  fused); against our faster eager row, the DynaSegFormer issue's "≤ 0.3× published" would mean ≈ 0.55× fused
  and make its own "≤ 0.85× fused" redundant. The target is checked against both published rows;
- ``fused`` — the dense model's ``fuse()`` (SegFormer: decoder folded into the additive form, SDPA attention; BN
  folded);
- ``dynamic s`` — ``from_segformer(dense, s).fuse()`` / ``from_topformer(dense, s).fuse()``: the student's inference
  form, which gathers the kept
  neurons per image and runs the narrower products (at s = 0 it gathers everything: gating cost, no saving);
  its ``fuse()`` folds the gates and pads the gathered widths with zero neurons to multiples of 8 (exact: e.g. a
  90-channel hidden layer runs as 96, faster on this CPU); ``unpadded`` rows are ``fuse(pad_multiple=1)``; each
  site plans (gate, top-r, gathers) in one native call where the kernel builds (``edgeseg.models.native``),
  and the ``PyTorch plans`` rows are the same models planning with PyTorch operators (``set_native(model, False)``);
- ``gates + gathers @ s`` — only the per-image overhead of the dynamic model: for every DGL site the token pooling,
  gate MLP, top-r and weight gathers (``plan()``, the code the forward runs), on the inputs of a real forward,
  all sites back to back; below the table, the same calls timed inside real forward passes (colder caches);
- ``DynaSegFormer-B0 s, plans precomputed`` — the same model with every site's ``plan()`` result computed once for
  this input and replayed: only the narrowed products run. It is the floor of the gathered path (zero gating
  cost); the gap to the fused dense row is what pruning the gated products can buy at that sparsity at all;
- ``untouched by DGL`` (SegFormer) — the fused dense model with every attention and Mix-FFN skipped: patch
  embeddings, norms, residual adds and the decoder, the time no sparsity removes. From it the script prints a
  bound: the ratio to the fused model if gating were free and the gated modules' time fell with their executed MACs,
  ``U + (1 − U) · w`` (``U`` its same-round ratio to the fused model, ``w`` the gated modules' MACs left at s).
  Optimistic twice over: it also skips the attention's sequence-reduction conv, which DGL keeps, and the softmax
  over N × N/R² scores, which does not shrink with the kept channels, is counted as if it did. A second bound
  lifts the latter: the attention kernel keeps its measured share of the fused forward and scales as measured
  at the kept head width (standalone, stage by stage), only the rest of the gated time falls with its MACs.

Ratios are the median over rounds of the same-round ratio (each round times every row back to back), which resists
the bursts of a shared machine better than a ratio of medians; ``min ms`` is the least disturbed run.

Gates: the students get random gate weights (a fresh gate outputs G ≡ 1, a tie), so each image keeps its own
channels as a trained gate would; latency does not depend on which channels are kept.

    .venv/bin/python benchmarks/dynamic_latency.py [--model segformer-b0] [--rounds 20] [--threads 2]
        [--size 512 512] [--keep-freed-memory] [--pytorch-plans 0.3 0.5]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from edgeseg import create_model
from edgeseg.deploy.allocator import keep_freed_memory
from edgeseg.deploy.benchmark import compare_latency, count_gmacs
from edgeseg.models.dynamic import DynamicGatedLinear, random_gates_, set_native
from edgeseg.models.dynasegformer import DynamicEfficientSelfAttention, DynamicMixFFN, from_segformer
from edgeseg.models import native
from edgeseg.models.hf_segformer import save_hf_folder
from edgeseg.models.topformer import DynamicAttention, DynamicMLP, from_topformer

TARGETS = {  # (sparsity, reference row) -> max ratio, the DynaSegFormer issue's targets for SegFormer-B0
    (0.3, "published"): 0.3,
    (0.3, "fused"): 0.85,
    (0.5, "fused"): 0.7,
}


_DGL_SITES = (DynamicEfficientSelfAttention, DynamicMixFFN, DynamicGatedLinear, DynamicAttention, DynamicMLP)


def dgl_site_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
    """Every DGL site of ``model`` with the input it receives in one forward pass of ``x``."""
    sites: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: sites.append((mod, args[0])))
             for m in model.modules() if isinstance(m, _DGL_SITES)]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return sites


def gate_overhead_fn(model: nn.Module, x: torch.Tensor):
    """A callable running every DGL site's ``plan`` (pooling, gate, top-r, gathers) on its input of one forward."""
    sites = dgl_site_inputs(model, x)

    def run() -> None:
        for module, inp in sites:
            module.plan(inp)

    return run


def plans_inside_forward_ms(model: nn.Module, x: torch.Tensor, forwards: int) -> float:
    """The median over ``forwards`` real forward passes of the time all DGL sites' ``plan()`` calls take inside
    them: the gating as the forward meets it, with the caches the rest of the forward leaves (colder than
    ``gate_overhead_fn``'s back-to-back calls)."""
    spent: list[float] = []

    def timed(plan):
        def run(*args):
            start = time.perf_counter()
            out = plan(*args)
            spent[-1] += time.perf_counter() - start
            return out
        return run

    sites = [m for m in model.modules() if isinstance(m, _DGL_SITES)]
    for m in sites:
        m.plan = timed(m.plan)  # an instance attribute: the forward's ``self.plan`` finds it first
    try:
        with torch.inference_mode():
            for _ in range(forwards):
                spent.append(0.0)
                model(x)
    finally:
        for m in sites:
            del m.plan
    return statistics.median(spent) * 1e3


def precomputed_plans(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose DGL sites replay their ``plan()`` for ``x`` instead of gating: the narrowed
    products alone (valid for this input only; a measuring device, not a model)."""
    model = copy.deepcopy(model)
    with torch.inference_mode():
        plans = [(module, module.plan(inp)) for module, inp in dgl_site_inputs(model, x)]
    for module, plan in plans:
        module.plan = lambda *args, plan=plan: plan
    return model


class _Skip(nn.Module):
    """Stands in for a block's attention or Mix-FFN: the residual branch adds its input back, no compute."""

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return x


def untouched_by_dgl(fused: nn.Module) -> nn.Module:
    """A copy of a fused SegFormer with every attention and Mix-FFN (the modules DGL prunes) skipped."""
    model = copy.deepcopy(fused)
    for stage in model.encoder.stages:
        for block in stage.blocks:
            block.attn, block.mlp = _Skip(), _Skip()
    return model


def transformers_eager(dense: nn.Module) -> nn.Module | None:
    """Hugging Face's eager SegFormer holding ``dense``'s weights, or None when transformers is not installed."""
    try:
        from transformers import SegformerForSemanticSegmentation
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as folder:
        save_hf_folder(dense, folder)
        return SegformerForSemanticSegmentation.from_pretrained(folder, attn_implementation="eager").eval()


class AttentionKernel:
    """The attention kernel both fused models run (their ``attend()``: the native kernel where it is built, else
    ``F.scaled_dot_product_attention``) at each stage of a fused SegFormer, timed standalone at the dense head
    width and at each student's widths — its scores over the kept Q/K channels, its values at the padded width, as
    the student calls it: same tokens, same heads.

    Its MACs scale with the width; the softmax over the N × N/R² scores does not. ``scaling[s]`` is, per stage, the
    time at the student's width over the time at the dense width; ``share`` the dense kernel's time over the fused
    forward's (all the stage's blocks; standalone, so with warm caches: a lower estimate).
    """

    def __init__(self, fused: nn.Module, students: dict[float, nn.Module], x: torch.Tensor, rounds: int) -> None:
        shapes = []  # (tokens, key/value tokens, heads, head width) of each stage's first attention
        hooks = [stage.blocks[0].attn.register_forward_pre_hook(
            lambda m, args: shapes.append((args[0].shape[1], (args[1][0] // m.sr_ratio) * (args[1][1] // m.sr_ratio),
                                           m.num_heads, m.head_dim)))
            for stage in fused.encoder.stages]
        with torch.inference_mode():
            fused(x)
        for h in hooks:
            h.remove()
        self.shapes, self.depths = shapes, [len(stage.blocks) for stage in fused.encoder.stages]
        gates = {s: [st.encoder.stages[i].blocks[0].attn.qk_gate for i in range(len(shapes))]
                 for s, st in students.items()}
        self.widths = {s: [(g.keep, g.width) for g in gs] for s, gs in gates.items()}  # (scores, values) per stage
        gen = torch.Generator().manual_seed(0)
        fns = {}
        for i, (n, m, heads, dim) in enumerate(shapes):
            for keep, width in {(dim, dim), *(w[i] for w in self.widths.values())}:
                q, k, v = (torch.randn(1, t, heads, width, generator=gen).transpose(1, 2) for t in (n, m, m))
                fns[(i, keep, width)] = lambda q=q[..., :keep], k=k[..., :keep], v=v, \
                    attn=fused.encoder.stages[i].blocks[0].attn: attn.attend(q, k, v)
        self.times = compare_latency(fns, rounds=rounds)
        self.scaling = {s: [statistics.median(a / b for a, b in zip(self.times[(i, *w[i])], self.dense_times(i)))
                            for i in range(len(shapes))] for s, w in self.widths.items()}

    def dense_times(self, stage: int) -> list[float]:
        dim = self.shapes[stage][3]
        return self.times[(stage, dim, dim)]

    def share(self, fused_ms: float) -> list[float]:
        return [depth * statistics.median(self.dense_times(i)) / fused_ms for i, depth in enumerate(self.depths)]

    def gmacs(self, s: float | None = None) -> float:
        """The attention products' GMACs (Q·Kᵀ over the score channels, P·V over the value channels) over all
        blocks, dense or at sparsity ``s``."""
        return sum(depth * heads * n * m * (2 * dim if s is None else sum(self.widths[s][i]))
                   for i, ((n, m, heads, dim), depth) in enumerate(zip(self.shapes, self.depths))) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", nargs=2, type=int, default=[512, 512])
    parser.add_argument("--model", default="segformer-b0", help="dense teacher: segformer-b0…b5, topformer-tiny…base")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.3, 0.5])
    parser.add_argument("--floor", nargs="*", type=float, default=[0.3, 0.5],
                        help="sparsities to also time with plans precomputed (the gathered path's floor)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="run with edgeseg.deploy.allocator.keep_freed_memory(), as the edgeseg commands do")
    parser.add_argument("--unpadded", nargs="*", type=float, default=[0.3],
                        help="sparsities to also time without zero-padding the gathered widths")
    parser.add_argument("--pytorch-plans", nargs="*", type=float, default=[0.3, 0.5],
                        help="sparsities to also time with every site planning in PyTorch instead of the C kernel")
    args = parser.parse_args()

    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory needs Linux with glibc")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    size = tuple(args.size)
    x = torch.randn(1, 3, *size)
    dense = create_model(args.model).eval()
    segformer = args.model.startswith("segformer-")
    make_student = from_segformer if segformer else from_topformer
    models: dict[str, nn.Module] = {"published": dense, "fused": dense.fuse()}
    hf = transformers_eager(dense) if segformer else None
    sparsities = {*args.sparsities, *args.unpadded, *args.pytorch_plans}
    students = {s: random_gates_(make_student(dense, s)) for s in sparsities}
    for s in args.sparsities:
        models[f"dyna {s:.0%}"] = students[s].fuse()
    for s in args.unpadded:
        models[f"dyna {s:.0%} unpadded"] = students[s].fuse(pad_multiple=1)
    for s in args.pytorch_plans if native.available() else ():
        models[f"dyna {s:.0%}, PyTorch plans"] = torch_plans = students[s].fuse()
        set_native(torch_plans, False)
    for s in args.floor:
        models[f"dyna {s:.0%}, plans precomputed"] = precomputed_plans(models[f"dyna {s:.0%}"], x)
    if segformer:
        models["untouched by DGL"] = untouched_by_dgl(models["fused"])
    fns = {name: (lambda m=m: m(x)) for name, m in models.items()}
    if hf is not None:
        fns["transformers"] = lambda: hf(pixel_values=x).logits
    for s in args.sparsities:
        if s > 0:
            fns[f"gates+gathers {s:.0%}"] = gate_overhead_fn(models[f"dyna {s:.0%}"], x)
    gmacs = {name: count_gmacs(m, size) for name, m in models.items() if "precomputed" not in name}

    load_before = os.getloadavg()[0]
    times = compare_latency(fns, rounds=args.rounds)
    load_after = os.getloadavg()[0]
    med = {name: statistics.median(t) for name, t in times.items()}

    def ratio(name: str, ref: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times[ref]))

    family, variant = args.model.split("-", 1)
    dense_label = {"segformer": f"SegFormer-{variant.upper()}", "topformer": f"TopFormer-{variant.capitalize()}"}.get(
        family, args.model)
    dynamic_label = "Dyna" + dense_label if dense_label.startswith("SegFormer") else dense_label + " dynamic"
    print(f"{args.model} at {size[0]}×{size[1]}, batch 1, {torch.get_num_threads()} threads, "
          f"{args.rounds} alternating rounds "
          f"(load average {load_before:.1f} → {load_after:.1f} on {os.cpu_count()} CPUs)")
    refs = ["published", "fused"] + (["transformers"] if hf is not None else [])
    labels = {"published": f"{dense_label} published (edgeseg eager)", "fused": f"{dense_label} fused",
              "transformers": f"{dense_label} published (transformers eager)"}
    print("| model | GMACs | median ms | min ms | " + " | ".join(f"× {ref}" for ref in refs) + " |")
    print("|---|---|---|---|" + "---|" * len(refs))
    for name in fns:
        label = labels.get(name, f"{dynamic_label} {name[5:]}" if name.startswith("dyna") else name)
        g = f"{gmacs[name]:.2f}" if name in gmacs else "-"
        print(f"| {label} | {g} | {med[name]:.1f} | {min(times[name]):.1f} | "
              + " | ".join(f"{ratio(name, ref):.2f}" for ref in refs) + " |")
    print()
    for (s, ref), limit in (TARGETS.items() if args.model == "segformer-b0" else ()):
        for reference in [r for r in (ref, "transformers" if ref == "published" else None) if r in times]:
            for key in (f"dyna {s:.0%}", f"dyna {s:.0%} unpadded"):
                if key in med:
                    r = ratio(key, reference)
                    best = min(times[key]) / min(times[reference])
                    print(f"target: {dynamic_label} {key[5:]} ≤ {limit}× {reference}: {r:.2f} (min/min {best:.2f}) "
                          f"({'met' if r <= limit else 'NOT met'})")
    kernel = None
    if segformer:
        kernel = AttentionKernel(models["fused"], {s: models[f"dyna {s:.0%}"] for s in args.sparsities if s > 0}, x,
                                 args.rounds)
        for s, scaling in kernel.scaling.items():
            keep, width = kernel.widths[s][0]
            print(f"attention kernel at {s:.0%} (scores over {keep}, values over {width} of {kernel.shapes[0][3]} "
                  f"channels per head), time over the dense width, stages 1–4: "
                  + " ".join(f"{r:.2f}" for r in scaling))
    if "untouched by DGL" in times:
        untouched = ratio("untouched by DGL", "fused")
        gated = gmacs["fused"] - gmacs["untouched by DGL"]
        print(f"untouched by DGL: {untouched:.2f} of the fused forward ({gmacs['untouched by DGL']:.2f} of its "
              f"{gmacs['fused']:.2f} GMACs)")
        share = kernel.share(med["fused"])
        print(f"attention kernel (dense, standalone): {sum(share):.2f} of the fused forward, "
              f"{kernel.gmacs():.2f} GMACs; stages 1–4: " + " ".join(f"{a:.2f}" for a in share))
        for s in args.sparsities:
            if s > 0:
                left = gmacs[f"dyna {s:.0%}"] - gmacs["untouched by DGL"]
                w = left / gated
                print(f"bound at {s:.0%} (gating free, gated modules' time ∝ their MACs, {w:.2f} of them left): "
                      f"{untouched + (1 - untouched) * w:.2f}× fused")
                # The same, but the attention kernel's share scales as measured, not with its MACs.
                rest = (left - kernel.gmacs(s)) / (gated - kernel.gmacs())
                kept = sum(a * k for a, k in zip(share, kernel.scaling[s]))
                print(f"bound at {s:.0%} with the attention kernel as measured (the rest of the gated time ∝ its "
                      f"MACs, {rest:.2f} left): {untouched + kept + (1 - untouched - sum(share)) * rest:.2f}× fused")
    for s in args.sparsities:
        if s > 0:
            share = ratio(f"gates+gathers {s:.0%}", f"dyna {s:.0%}")
            print(f"gate prediction + gathers at {s:.0%}: {med[f'gates+gathers {s:.0%}']:.1f} ms "
                  f"({share:.1%} of the {dynamic_label} forward); inside the forward (every plan() call timed over "
                  f"{args.rounds} forwards): {plans_inside_forward_ms(models[f'dyna {s:.0%}'], x, args.rounds):.1f} ms")


if __name__ == "__main__":
    main()
