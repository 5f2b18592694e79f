"""The native kernels against the PyTorch operators they replace — DGL plans (one C call per site) and the
SegFormer decoder's resize-and-add — and their fallbacks."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from edgeseg import create_model
from edgeseg.deploy.benchmark import random_weights_
from edgeseg.models import native
from edgeseg.models.native import NativePlan, Part, Selection
from edgeseg.models.dynamic import (
    DynamicGatedLinear,
    FoldedGate,
    dynamic_gates,
    fold_gates,
    random_gates_,
    set_native,
    set_sparsity,
    top_r,
)
from edgeseg.models.dynasegformer import from_segformer
from edgeseg.models.topformer import DynamicAttention, DynamicMLP, from_topformer


@pytest.fixture
def native_kernel():
    """The compiled kernel; missing it is a failure in CI (the machine has a C compiler), a skip elsewhere."""
    if not native.available():
        if os.environ.get("CI") == "true":
            pytest.fail("the native kernels did not build in CI")
        pytest.skip("no C compiler: the native kernels are not available here")
    return native.library()


def _planned(model: torch.nn.Module) -> list[bool]:
    """Per DGL site (a module owning gates), whether it built a native plan (attention keeps it on its Q/K gate)."""
    sites = [m for m in model.modules() if any(isinstance(c, type(next(dynamic_gates(model)))) for c in m.children())]
    return [any(bool(g.native_plans) for g in site.children() if hasattr(g, "native_plans")) for site in sites]


def _fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with no native plan built yet (copies never carry plans), so a test can see whether its forward builds
    (uses) one."""
    model = copy.deepcopy(model)
    assert not any(gate.native_plans for gate in dynamic_gates(model))
    return model


def _random_gate(gen: torch.Generator, C: int, hidden: int, n: int) -> FoldedGate:
    """A folded gate over ``n`` neurons from ``C`` pooled channels, every weight random."""
    return FoldedGate(torch.randn(hidden, C, generator=gen), torch.randn(hidden, generator=gen),
                      torch.randn(n, hidden, generator=gen), torch.randn(n, generator=gen), 1e-5)


@pytest.fixture(scope="module")
def fused_student():
    torch.manual_seed(0)
    dense = create_model("segformer-b0", num_classes=8).eval()
    with torch.no_grad():  # initialised at 0; a padding slot must not leak GELU(bias) into fc2
        for block in (b for stage in dense.encoder.stages for b in stage.blocks):
            block.mlp.dwconv.bias.normal_()
    return {s: random_gates_(from_segformer(dense, s), seed=1).fuse() for s in (0.3, 0.5)}


@pytest.mark.parametrize("sparsity", [0.3, 0.5])  # 0.3: padded widths (support slots); 0.5: exact widths
@pytest.mark.parametrize("batch", [1, 2])
def test_native_plans_equal_pytorch_plans(native_kernel, fused_student, sparsity, batch):
    model = fused_student[sparsity]
    reference = _fresh_copy(model)
    set_native(reference, False)
    x = torch.randn(batch, 3, 64, 96, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        got, want = model(x), reference(x)
        again = model(x)  # buffers reused: a second call must not see the first one's state
    assert _planned(model) and all(_planned(model)), "every site should have planned natively"
    assert not any(_planned(reference))
    assert (got - want).abs().max() <= 1e-5
    assert torch.equal(got, again)


def test_fused_student_replans_when_a_sparsity_changes(native_kernel, fused_student):
    """A site resolves its native plan once per sparsity and padding (``DynamicGate.recent_plan``): after
    ``set_sparsity``, or one gate of an attention set apart from the other, the next forward plans for the new
    widths — natively where the kernel applies, in PyTorch where it does not (unequal Q/K and V widths)."""
    model = _fresh_copy(fused_student[0.3])
    reference = _fresh_copy(model)
    set_native(reference, False)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    attn = model.encoder.stages[0].blocks[0].attn
    with torch.inference_mode():
        model(x)
        for m in (model, reference):
            set_sparsity(m, 0.5)
        assert (model(x) - reference(x)).abs().max() <= 1e-5
        assert set(attn.qk_gate.native_plans) == {(22, 24), (16, 16)}
        for m in (model, reference):
            m.encoder.stages[0].blocks[0].attn.v_gate.sparsity = 0.25
        assert (model(x) - reference(x)).abs().max() <= 1e-5
    assert copy.deepcopy(attn).qk_gate._recent is None  # a copy resolves its own plans


def test_fused_dynamic_topformer_replans_when_its_sparsity_changes(native_kernel):
    """TopFormer's extractor sites resolve their plans once per sparsity too (``recent_plan``): after
    ``set_sparsity`` the next forward plans the new widths."""
    torch.manual_seed(0)
    teacher = create_model("topformer-tiny", num_classes=5).eval()
    model = random_gates_(from_topformer(teacher, 0.3), seed=2).fuse()
    reference = _fresh_copy(model)
    set_native(reference, False)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        model(x)
        for m in (model, reference):
            set_sparsity(m, 0.5)
        assert (model(x) - reference(x)).abs().max() <= 1e-5
    # every site planned natively at both sparsities: its first gate holds the site's plans (an attention's V gate
    # shares its Q/K gate's)
    sites = [m.qk_gate if isinstance(m, DynamicAttention) else m.gate for m in model.modules()
             if isinstance(m, (DynamicAttention, DynamicMLP))]
    assert sites and all(len(gate.native_plans) == 2 for gate in sites)


def test_native_plans_follow_conversions_and_loads(native_kernel, fused_student):
    """Plans hold the site's tensors. A deep copy, ``.double().float()`` and ``load_state_dict(assign=True)`` hold
    or put new tensors in place of the old: the next forward plans from the current weights, as the PyTorch plans
    do."""
    original = _fresh_copy(fused_student[0.3])
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        original(x)  # plans built on the original tensors
        model = copy.deepcopy(original)
        block = model.encoder.stages[1].blocks[0]
        block.mlp.fc1.weight.mul_(3)  # the copy's own weights, which its plans must read
        reference = copy.deepcopy(model)
        set_native(reference, False)
        assert (model(x) - reference(x)).abs().max() <= 1e-5
        model.double().float()
        block.mlp.fc1.weight.mul_(2)
        block.attn.q.weight.mul_(2)
        reference = copy.deepcopy(model)
        set_native(reference, False)
        assert (model(x) - reference(x)).abs().max() <= 1e-5
        state = {k: v * 1.5 if k.endswith(("fc1.weight", ".q.weight")) else v for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
        reference.load_state_dict(state)
        got = model(x)
        assert (got - reference(x)).abs().max() <= 1e-5
    assert _planned(model) and all(_planned(model))


@pytest.mark.parametrize("C, hidden", [(24, 16), (13, 11), (45, 37)])  # the gate MLP's vector loops and tails
def test_kernel_top_r_matches_torch(native_kernel, C, hidden):
    gen = torch.Generator().manual_seed(0)
    n, groups, keep, width, tokens = 64, 4, 11, 13, 7
    gate = _random_gate(gen, C, hidden, n)
    source = torch.arange(n, dtype=torch.float32)[:, None] + 1.0  # a gathered row names its neuron
    slots = groups * width
    plan = NativePlan(gate, [Selection(0, groups, n // groups, keep, width)],
                      [[Part(source, 0, slots)], [Part(source, 0, slots, scale="value")],
                       [Part(source, 0, slots, scale="support")]], lambda bufs, batch: tuple(bufs))
    x = torch.randn(3, tokens, C, generator=gen)
    with torch.inference_mode():
        (rows, scaled, supported), values, index = plan(x)
        want_values, want_index = top_r(gate(x.mean(dim=1)), keep, groups, width)
    slots = index.reshape(3, groups, width)
    real, pad = slots[..., :keep], slots[..., keep:]
    want = want_index.reshape(3, groups, width)
    assert torch.equal(real.sort(-1).values, want[..., :keep].sort(-1).values)  # the same kept neurons
    assert torch.equal(pad.sort(-1).values, want[..., keep:].sort(-1).values)  # the same padding neurons
    logits = gate(x.mean(dim=1))
    assert torch.allclose(values.reshape(3, groups, width)[..., :keep], logits.gather(1, real.reshape(3, -1))
                          .reshape(3, groups, keep), atol=1e-5)
    assert (values.reshape(3, groups, width)[..., keep:] == 0).all()
    assert torch.equal(rows.reshape(3, -1), index.float() + 1)
    assert torch.allclose(scaled.reshape(3, -1), (index.float() + 1) * values, atol=1e-5)
    support = (torch.arange(width) < keep).float().repeat(groups)
    assert torch.equal(supported.reshape(3, -1), (index.float() + 1) * support)


@pytest.mark.parametrize("ties", ["all", "some", "nan"])
def test_kernel_breaks_ties_as_torch_does(native_kernel, ties):
    """Equal gate values (a fresh gate predicts 1 everywhere) go to the lower index, as in ``top_r``, and NaN ranks
    above every number, as in its sort: the kernel keeps the same neurons, and the same padding ones, as the PyTorch
    plan."""
    gen = torch.Generator().manual_seed(3)
    C, hidden, n, groups, keep, width = 8, 4, 48, 2, 9, 16
    b2 = torch.ones(n) if ties == "all" else torch.randint(0, 3, (n,), generator=gen).float()
    if ties == "nan":
        b2[torch.randperm(n, generator=gen)[:7]] = float("nan")
    gate = FoldedGate(torch.randn(hidden, C, generator=gen), torch.randn(hidden, generator=gen),
                      torch.zeros(n, hidden), b2, 1e-5)
    plan = NativePlan(gate, [Selection(0, groups, n // groups, keep, width)],
                      [[Part(torch.randn(n, 3, generator=gen), 0, groups * width)]], lambda bufs, batch: tuple(bufs))
    x = torch.randn(2, 5, C, generator=gen)
    with torch.inference_mode():
        _, _, index = plan(x)
        want = top_r(gate(x.mean(dim=1)), keep, groups, width)[1]
    got, want = index.reshape(2, groups, width), want.reshape(2, groups, width)
    for part in (slice(0, keep), slice(keep, width)):
        assert torch.equal(got[..., part].sort(-1).values, want[..., part].sort(-1).values)


@pytest.mark.parametrize("layout", ["tokens", "long tokens", "nchw", "channels_last", "strided", "cropped", "column"])
def test_kernel_pools_every_layout(native_kernel, layout):
    """The kernel pools its input itself, read in place: token sequences, maps in either memory format, every
    other column of a map (its tokens one stride apart); maps whose tokens are not (cropped) are copied first. 20000
    tokens near 10 keep float32 precision: the gate values match the logits of the float64 mean to 1e-5 (one
    float32 sum of all the tokens would miss by 7e-4)."""
    gen = torch.Generator().manual_seed(5)
    C, hidden, n, keep = 16, 8, 32, 20
    gate = _random_gate(gen, C, hidden, n)
    plan = NativePlan(gate, [Selection(0, 1, n, keep, keep)], [[Part(torch.randn(n, 3, generator=gen), 0, keep)]],
                      lambda bufs, batch: tuple(bufs))
    if layout in ("tokens", "long tokens"):
        tokens = 20000 if layout == "long tokens" else 5
        x, dims = torch.randn(2, tokens, C, generator=gen) * 0.1 + torch.randn(C, generator=gen) + 10, (1,)
    else:
        x, dims = torch.randn(2, C, 9, 1 if layout == "column" else 8, generator=gen), (2, 3)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            x = x[:, :, :, ::2]
        elif layout == "cropped":
            x = x[:, :, :, 1:5]
    with torch.inference_mode():
        _, values, index = plan(x, dims)
        logits = gate(x.double().mean(dim=dims).float())
    assert torch.allclose(values, logits.gather(1, index), atol=1e-5)
    assert torch.equal(index.sort(1).values, logits.topk(keep, dim=1).indices.sort(1).values)


def test_plan_buffers_are_bounded_per_thread_and_go_with_it(native_kernel):
    """A long-lived server calls a plan from many request threads and batch sizes: each thread keeps the buffers of
    its last two batch sizes, a finished thread's are freed, and a copy of the plan builds its own."""
    import copy
    import gc
    import threading
    import weakref

    gen = torch.Generator().manual_seed(7)
    C, hidden, n, keep = 8, 4, 16, 6
    gate = _random_gate(gen, C, hidden, n)
    plan = NativePlan(gate, [Selection(0, 1, n, keep, keep)], [[Part(torch.randn(n, 3, generator=gen), 0, keep)]],
                      lambda bufs, batch: tuple(bufs))
    x = torch.randn(4, 5, C, generator=gen)
    with torch.inference_mode():
        expected = [plan(x[:b])[1].clone() for b in (1, 2, 3, 4)]
        for b in (2, 1, 3):
            plan(x[:b])
        assert list(plan._local.states) == [1, 3]  # 2 was the least recently used
        seen = []

        def request() -> None:
            with torch.inference_mode():
                values = plan(x[:2])[1]
                seen.append((values.clone(), weakref.ref(values)))

        worker = threading.Thread(target=request)
        worker.start()
        worker.join()
        del worker
        gc.collect()
        assert torch.equal(seen[0][0], expected[1]) and seen[0][1]() is None
        twin = copy.deepcopy(plan)
        assert torch.equal(twin(x[:4])[1], expected[3]) and list(twin._local.states) == [4]
        assert list(plan._local.states) == [1, 3]


def test_kernel_splits_pooling_and_gathers_over_threads(native_kernel):
    """Large sites pool and gather on PyTorch's threads: the same plan as on one thread, rows where they belong."""
    gen = torch.Generator().manual_seed(6)
    C, hidden, n, keep = 16, 8, 4096, 3000
    gate = _random_gate(gen, C, hidden, n)
    first, second = torch.randn(n, 24, generator=gen), torch.randn(n, 24, generator=gen)
    plan = NativePlan(gate, [Selection(0, 2, n // 2, keep // 2, keep // 2)],  # 2 × 72000 floats: split
                      [[Part(first, 0, 1700), Part(second, 1700, keep - 1700, scale="value")]],
                      lambda bufs, batch: tuple(bufs))
    x = torch.randn(2, 20000, C, generator=gen) + 3  # 320000 floats per image: split
    runs = {}
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for t in (1, 2):
                torch.set_num_threads(t)
                (gathered,), values, index = plan(x)
                runs[t] = gathered.clone(), values.clone(), index.clone()
    finally:
        torch.set_num_threads(threads)
    (gathered, values, index), other = runs[1], runs[2]
    assert torch.equal(other[2], index) and torch.allclose(other[1], values, rtol=1e-6, atol=0)
    assert torch.allclose(other[0], gathered, rtol=1e-6, atol=0)
    want = torch.cat([first[index[:, :1700]], second[index[:, 1700:]] * values[:, 1700:, None]], dim=1)
    assert torch.equal(other[0], want)


def test_falls_back_to_pytorch_without_compiler(monkeypatch, tmp_path, fused_student):
    monkeypatch.setenv("EDGESEG_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native.library.cache_clear()
    try:
        assert not native.available()
        model = _fresh_copy(fused_student[0.5])
        with torch.inference_mode():
            model(torch.randn(1, 3, 64, 64))
        assert not any(_planned(model))
        monkeypatch.delenv("CC")
        monkeypatch.setenv(native.ENV_SWITCH, "0")
        native.library.cache_clear()
        assert not native.available()
    finally:
        native.library.cache_clear()


def test_unloadable_cached_kernel_falls_back(monkeypatch, tmp_path):
    """A cached file that does not load (say, built elsewhere) means PyTorch plans, not a crash."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("EDGESEG_CACHE_DIR", str(tmp_path))
    native.kernel_path(compiler).write_bytes(b"not a shared library")
    native.library.cache_clear()
    try:
        assert not native.available()
    finally:
        native.library.cache_clear()


def test_native_plan_only_without_autograd(native_kernel, fused_student):
    model = _fresh_copy(fused_student[0.5])
    x = torch.randn(1, 3, 64, 64)
    with torch.enable_grad():
        want = model(x)
    assert not any(_planned(model))
    with torch.no_grad():
        assert (model(x) - want).abs().max() <= 1e-5
    assert all(_planned(model))


def test_no_native_plan_on_traced_tensors(native_kernel):
    # torch.export (the path of the dynamo ONNX exporter, ExecuTorch, AOTInductor) runs the forward on fake tensors
    # with autograd off and no TorchScript tracing: the plan must be PyTorch operators the graph can record.
    torch.manual_seed(0)
    dgl = random_gates_(DynamicGatedLinear(24, 80, sparsity=0.3)).eval()
    fold_gates(dgl)
    x = torch.randn(2, 10, 24)
    with torch.no_grad():
        program = torch.export.export(dgl, (x,))
        assert not dgl.gate.native_plans
        assert (program.module()(x) - dgl(x)).abs().max() <= 1e-5
    assert dgl.gate.native_plans  # the eager forward after it did plan natively


def test_native_plans_equal_pytorch_plans_topformer(native_kernel):
    """TopFormer's sites: Q/K and V select over heads of different widths (two selections), maps are pooled.

    The tolerance is relative: this family's attention amplifies float32 rounding of random weights to ~1e-5 of the
    logits (see test_topformer_dynamic's float64 test), and the kernel rounds the gate MLP differently."""
    torch.manual_seed(0)
    dense = create_model("topformer-tiny", num_classes=5).eval()
    model = random_gates_(from_topformer(dense, 0.3), seed=2).fuse()
    reference = _fresh_copy(model)
    set_native(reference, False)
    x = torch.randn(2, 3, 128, 96)
    with torch.inference_mode():
        got, want = model(x), reference(x)
    assert all(_planned(model)) and not any(_planned(reference))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_native_plan_multiple_selections_and_parts(native_kernel):
    """Two selections of different group widths, and one output gathered from three parts of one source."""
    gen = torch.Generator().manual_seed(3)
    C, hidden, heads, qk_dim, v_dim = 12, 8, 2, 4, 6
    nk, nv = heads * qk_dim, heads * v_dim
    gate = FoldedGate(torch.randn(hidden, C, generator=gen), torch.randn(hidden, generator=gen),
                      torch.randn(nk + nv, hidden, generator=gen), torch.randn(nk + nv, generator=gen), 1e-5)
    rows = torch.randn(2 * nk + nv, 5, generator=gen)
    (kq, wq), (kv, wv) = (3, 4), (4, 6)
    sq, sv = heads * wq, heads * wv
    plan = NativePlan(gate, [Selection(0, heads, qk_dim, kq, wq), Selection(nk, heads, v_dim, kv, wv)],
                      [[Part(rows, 0, sq), Part(rows, 0, sq, offset=-nk, scale="value"),
                        Part(rows, sq, sv, offset=-nk, scale="value")]], lambda bufs, batch: tuple(bufs))
    x = torch.randn(2, C, 3, 3, generator=gen)
    with torch.inference_mode():
        (got,), values, index = plan(x, (2, 3))
        logits = gate(x.mean(dim=(2, 3)))
    for b in range(2):
        for (start, width, keep, per), first in (((0, wq, kq, qk_dim), 0), ((nk, wv, kv, v_dim), sq)):
            for h in range(heads):
                slots = slice(first + h * width, first + h * width + keep)
                want = logits[b, start + h * per:start + (h + 1) * per].topk(keep).indices + start + h * per
                assert torch.equal(index[b, slots].sort().values, want.sort().values)
        q, k, v = index[b, :sq], index[b, :sq] + nk, index[b, sq:] + nk
        want_rows = torch.cat([rows[q], rows[k] * values[b, :sq, None], rows[v] * values[b, sq:, None]])
        assert torch.allclose(got[b], want_rows, atol=1e-6)


def test_native_plan_generic_dgl(native_kernel):
    torch.manual_seed(0)
    dgl = random_gates_(DynamicGatedLinear(24, 80, act=torch.nn.Sigmoid, sparsity=0.3)).eval()
    fold_gates(dgl)
    x = torch.randn(3, 10, 24)
    with torch.no_grad():
        got = dgl(x)
        set_native(dgl, False)
        want = dgl(x)
    assert dgl.gate.native_plans and (got - want).abs().max() <= 1e-5


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """(B, h, w, C) contiguous, seen as (B, C, h, w): the layout SegFormer's decoder keeps its maps in."""
    return t.permute(0, 3, 1, 2)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels", [16, 12])  # eight at a time, and a remainder
def test_resize_add_matches_interpolate(native_kernel, channels, relu):
    g = torch.Generator().manual_seed(0)
    H, W = 50, 70
    maps = [_channels_last(torch.randn(2, h, w, channels, generator=g)) for h, w in ((25, 35), (13, 17), (7, 9))]
    acc = torch.randn(2, 50, 70, channels, generator=g)
    acc[1, 20, 30, 5] = float("nan")  # stays NaN through the ReLU, as in torch.relu
    want = _channels_last(acc.clone())
    for m in maps:
        want += torch.nn.functional.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
    if relu:
        want = want.relu()
    with torch.no_grad():
        band = _channels_last(acc[:, 11:29].clone())  # rows 11..28 of the 50: offsets, clamping inside the band
        assert native.resize_add_(band, maps, 11, H, relu=relu)
        whole = _channels_last(acc.clone())
        assert native.resize_add_(whole, maps, 0, H, relu=relu)
    torch.testing.assert_close(band, want[:, :, 11:29], rtol=0, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(whole, want, rtol=0, atol=1e-5, equal_nan=True)
    assert bool((whole.nan_to_num(0.0) >= 0).all()) == relu  # (the random sums do go below 0)


def test_resize_add_splits_rows_over_threads(native_kernel):
    """Rows are independent: two threads give the one-thread result bit for bit (each row written once)."""
    g = torch.Generator().manual_seed(1)
    maps = [_channels_last(torch.randn(3, h, w, 64, generator=g)) for h, w in ((10, 12), (5, 6))]
    acc = torch.randn(3, 9, 24, 64, generator=g)  # 41472 floats: over the kernel's 32768-float threshold, split
    runs, threads = [], torch.get_num_threads()
    try:
        with torch.no_grad():
            for t in (1, 2):
                torch.set_num_threads(t)
                out = _channels_last(acc.clone())
                assert native.resize_add_(out, maps, 5, 20, relu=True)
                runs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1])
    want = _channels_last(acc.clone())
    for m in maps:
        want += torch.nn.functional.interpolate(m, size=(20, 24), mode="bilinear", align_corners=False)[:, :, 5:14]
    assert (runs[1] - want.relu()).abs().max() <= 1e-5


def test_resize_add_declines_what_it_cannot_run(native_kernel):
    acc = _channels_last(torch.zeros(1, 8, 8, 16))
    small = _channels_last(torch.ones(1, 4, 4, 16))
    with torch.enable_grad():
        assert not native.resize_add_(acc, [small.requires_grad_()], 0, 8)  # autograd: PyTorch records the graph
    with torch.no_grad():
        assert not native.resize_add_(acc.double(), [small.double()], 0, 8)
        assert not native.resize_add_(acc, [small.contiguous()], 0, 8)  # NCHW strides
        assert not native.resize_add_(acc, [_channels_last(torch.ones(1, 4, 4, 8))], 0, 8)  # channel counts differ
    assert acc.abs().max() == 0  # declined: untouched


@pytest.mark.parametrize("size", [(128, 128), (65, 97)])  # in row bands, and one whole pass (bands not exact)
def test_segformer_decoder_native_equals_pytorch(native_kernel, monkeypatch, size):
    torch.manual_seed(0)
    model = random_weights_(create_model("segformer-b0", num_classes=8)).eval().fuse()
    x = torch.randn(2, 3, *size)
    ran, kernel = [], native.resize_add_

    def spy(*args, **kwargs):
        assert kwargs == {"relu": True}  # the fused decoder's BN is folded: its ReLU runs in the same pass
        ran.append(kernel(*args, **kwargs))
        return ran[-1]

    with torch.no_grad():
        monkeypatch.setattr(native, "resize_add_", spy)
        got = model(x)
        model.decode_head.native = False
        want = model(x)
    assert ran and all(ran) and len(ran) == (2 if size == (128, 128) else 1)  # each band (32 rows), or the map, once
    assert (got - want).abs().max() <= 1e-5


def _attention_inputs(B: int, heads: int, N: int, M: int, dq: int, dv: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, heads, tokens, d) as the attention layers hold them: views of token-major products, K and V
    side by side in one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, heads * dq, generator=g)
    kv = torch.randn(B, M, heads * (dq + dv), generator=g)
    k, v = kv.split([heads * dq, heads * dv], dim=-1)
    return (x.view(B, N, heads, dq).transpose(1, 2), k.reshape(B, M, heads, dq).transpose(1, 2),
            v.reshape(B, M, heads, dv).transpose(1, 2))


@pytest.mark.parametrize("shape, scale", [
    ((1, 1, 300, 40, 32, 32), 32**-0.5),  # many query blocks, keys in eights
    ((3, 2, 17, 5, 7, 13), 0.35),  # a partial block, key and channel remainders, unequal widths
    ((2, 5, 64, 64, 24, 24), 32**-0.5),  # DGL's kept widths, several heads
    ((1, 2, 40, 30, 16, 16), 12.0),  # scores ~100 apart: exp's clamp far below the maximum
])
def test_attention_matches_sdpa(native_kernel, shape, scale):
    B, heads, N, M, dq, dv = shape
    q, k, v = _attention_inputs(*shape)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    want = want.transpose(1, 2).reshape(B, N, heads * dv)
    widest = native._attention_paths()[0]
    with torch.no_grad():
        for path in range(widest + 1):  # baseline, AVX2, AVX-512: each the CPU can run
            got = native.attention(q, k, v, scale, path=path)
            assert got.shape == (B, N, heads * dv)
            assert (got.double() - want).abs().max() <= 1e-5, path
        with pytest.raises(ValueError, match="not available"):
            native.attention(q, k, v, scale, path=widest + 1)


def test_attention_threads_split_the_same_work(native_kernel):
    q, k, v = _attention_inputs(1, 3, 70, 20, 24, 24)  # 3 · 5 blocks of 16 (AVX-512), 3 · 9 of 8: uneven halves
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = native.attention(q, k, v, 0.2)
            torch.set_num_threads(2)
            two = native.attention(q, k, v, 0.2)
    finally:
        torch.set_num_threads(threads)
    if native._attention_paths()[1]:
        assert torch.equal(one, two)
    else:  # built without OpenMP: one thread only, PyTorch's attention when it runs several
        assert one is not None and two is None


def test_attention_declines_what_it_cannot_run(native_kernel):
    q, k, v = _attention_inputs(1, 2, 20, 8, 16, 16)
    with torch.enable_grad():
        assert native.attention(q.requires_grad_(), k, v, 0.1) is None  # autograd: PyTorch records the graph
    with torch.no_grad():
        assert native.attention(q.double(), k.double(), v.double(), 0.1) is None
        assert native.attention(q.transpose(2, 3), k, v, 0.1) is None  # channels not contiguous
        assert native.attention(q, k[:, :1], v, 0.1) is None  # heads differ


def test_segformer_attention_native_equals_sdpa(native_kernel, monkeypatch):
    torch.manual_seed(0)
    model = random_weights_(create_model("segformer-b0", num_classes=8)).eval().fuse()
    x = torch.randn(2, 3, 96, 64)
    results, kernel = [], native.attention
    use_kernel = True

    def spy(q, k, v, scale):
        results.append(kernel(q, k, v, scale) if use_kernel else None)
        return results[-1]

    monkeypatch.setattr(native, "attention", spy)
    with torch.no_grad():
        got = model(x)
        use_kernel = False
        want = model(x)  # scaled_dot_product_attention
    assert len(results) == 16 and all(r is not None for r in results[:8])  # the kernel ran at all 8 blocks
    assert (got - want).abs().max() <= 1e-5


def _resized_argmax(logits: torch.Tensor, size: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
    x = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    if out_size != size:
        x = torch.nn.functional.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
    return x.argmax(1)


@pytest.mark.parametrize("K, size, out_size", [
    (150, (64, 96), (64, 96)),  # one resize (the network input is the image)
    (150, (64, 96), (150, 131)),  # up, then up in one axis and down in the other
    (13, (40, 56), (17, 23)),  # classes after the last eight; up, then down
    (5, (30, 30), (30, 30)),  # fewer classes than a vector
])
def test_resize_argmax_matches_interpolate(native_kernel, K, size, out_size):
    # a view of padded classes, as a fused SegFormer's logits are: pixels K + 2 floats apart
    logits = torch.randn(2, 16, 24, K + 2, generator=torch.Generator().manual_seed(K))[..., :K].permute(0, 3, 1, 2)
    with torch.no_grad():
        got = native.resize_argmax(logits, size, out_size)
    assert got.dtype == torch.int64 and torch.equal(got, _resized_argmax(logits, size, out_size))


@pytest.mark.parametrize("K, tied", [(16, (6, 9)), (16, (3, 11)), (13, (2, 12)), (5, (1, 4))])
def test_resize_argmax_ties_go_to_the_lowest_class(native_kernel, K, tied):
    """As torch.argmax: lanes keep their first maximum, lanes and the classes after them give way to lower ones."""
    logits = torch.zeros(1, 5, 7, K)
    logits[..., list(tied)] = 1.0
    with torch.no_grad():
        got = native.resize_argmax(logits.permute(0, 3, 1, 2), (20, 28), (9, 31))
    assert (got == tied[0]).all()


def test_resize_argmax_declines_what_it_cannot_run(native_kernel):
    logits = torch.randn(1, 4, 6, 5).permute(0, 3, 1, 2)  # channels-last (1, 5, 4, 6)
    with torch.no_grad():
        assert native.resize_argmax(logits.contiguous(), (8, 12)) is None  # NCHW
        assert native.resize_argmax(logits.double(), (8, 12)) is None
    with torch.enable_grad():
        assert native.resize_argmax(logits.requires_grad_(), (8, 12)) is None


@pytest.mark.parametrize("shape", [(2, 300, 32), (1, 20000, 32), (3, 7, 160), (5, 13)])  # 20000 rows: split
def test_layer_norm_matches_torch(native_kernel, shape):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g) * 3 + 1
    weight, bias = torch.randn(shape[-1], generator=g), torch.randn(shape[-1], generator=g)
    for eps in (1e-6, 0.5):  # a large eps: its place in the formula shows
        with torch.no_grad():
            got = native.layer_norm(x, weight, bias, eps)
        want = torch.nn.functional.layer_norm(x, (shape[-1],), weight, bias, eps)
        assert (got - want).abs().max() <= 1e-5


def test_layer_norm_declines_what_it_cannot_run(native_kernel):
    x, w, b = torch.randn(4, 8), torch.ones(8), torch.zeros(8)
    with torch.no_grad():
        assert native.layer_norm(x.t(), torch.ones(4), torch.zeros(4), 1e-5) is None  # rows not contiguous
        assert native.layer_norm(x.double(), w.double(), b.double(), 1e-5) is None
        assert native.layer_norm(x, torch.ones(7), b, 1e-5) is None
    with torch.enable_grad():
        assert native.layer_norm(x.requires_grad_(), w, b, 1e-5) is None


def test_fused_segformer_norms_are_native_layer_norms(native_kernel):
    from edgeseg.models.layers import NativeLayerNorm

    torch.manual_seed(0)
    model = random_weights_(create_model("segformer-b0", num_classes=8)).eval()
    fused = model.fuse()
    norms = [m for m in fused.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(type(m) is NativeLayerNorm for m in norms)
    plain = torch.nn.LayerNorm(32, eps=1e-6)
    assert NativeLayerNorm.from_layer_norm(plain).state_dict().keys() == plain.state_dict().keys()
    eager = dict(model.named_modules())
    assert all(m.eps == eager[name].eps for name, m in fused.named_modules() if isinstance(m, NativeLayerNorm))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max() <= 1e-4
        double = model.double().fuse()  # the norms keep the model's dtype (PyTorch's kernel runs them)
        assert (double(x.double()) - model(x.double())).abs().max() <= 1e-9


def test_kernels_write_float32_whatever_the_default_dtype(native_kernel, fused_student):
    """The kernels write float32: their outputs are float32 tensors even where a script made float64 the default."""
    import copy

    model, x = fused_student[0.3], torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            got = copy.deepcopy(model)(x)  # a copy builds its plans' buffers afresh, under the float64 default
        finally:
            torch.set_default_dtype(previous)
    assert got.dtype == torch.float32 and torch.equal(got, want)
