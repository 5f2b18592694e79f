"""The native DGL plan (one C call per site) against the PyTorch plan it replaces, and its fallbacks."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from edgeseg import create_model
from edgeseg.models import dgl_native
from edgeseg.models.dgl_native import Gather, NativePlan
from edgeseg.models.dynamic import FoldedGate, from_segformer, random_gates_, set_native, top_r


@pytest.fixture
def native_kernel():
    """The compiled kernel; missing it is a failure in CI (the machine has a C compiler), a skip elsewhere."""
    if not dgl_native.available():
        if os.environ.get("CI") == "true":
            pytest.fail("the DGL kernel did not build in CI")
        pytest.skip("no C compiler: the native DGL plan is not available here")
    return dgl_native.library()


def _sites(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "native_plans")]


def _fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with no native plan built yet, so a test can see whether its forward builds (uses) one."""
    model = copy.deepcopy(model)
    for site in _sites(model):
        site.native_plans = {}
    return model


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
    assert _sites(model) and all(m.native_plans for m in _sites(model)), "every site should have planned natively"
    assert not any(m.native_plans for m in _sites(reference))
    assert (got - want).abs().max() <= 1e-5
    assert torch.equal(got, again)


def test_kernel_top_r_matches_torch(native_kernel):
    gen = torch.Generator().manual_seed(0)
    C, hidden, n, groups, keep, width, tokens = 24, 16, 64, 4, 11, 13, 7
    gate = FoldedGate(torch.randn(hidden, C, generator=gen), torch.randn(hidden, generator=gen),
                      torch.randn(n, hidden, generator=gen), torch.randn(n, generator=gen), 1e-5)
    source = torch.arange(n, dtype=torch.float32)[:, None] + 1.0  # a gathered row names its neuron
    plan = NativePlan(gate, groups, keep, width,
                      [Gather(source, 0, groups * width), Gather(source, 0, groups * width, scale="value"),
                       Gather(source, 0, groups * width, scale="support")], lambda outs, batch: tuple(outs))
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


def test_falls_back_to_pytorch_without_compiler(monkeypatch, tmp_path, fused_student):
    monkeypatch.setenv("EDGESEG_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    dgl_native.library.cache_clear()
    try:
        assert not dgl_native.available()
        model = _fresh_copy(fused_student[0.5])
        with torch.inference_mode():
            model(torch.randn(1, 3, 64, 64))
        assert not any(m.native_plans for m in _sites(model))
        monkeypatch.delenv("CC")
        monkeypatch.setenv(dgl_native.ENV_SWITCH, "0")
        dgl_native.library.cache_clear()
        assert not dgl_native.available()
    finally:
        dgl_native.library.cache_clear()


def test_native_plan_only_without_autograd(native_kernel, fused_student):
    model = _fresh_copy(fused_student[0.5])
    x = torch.randn(1, 3, 64, 64)
    with torch.enable_grad():
        want = model(x)
    assert not any(m.native_plans for m in _sites(model))
    with torch.no_grad():
        assert (model(x) - want).abs().max() <= 1e-5
    assert all(m.native_plans for m in _sites(model))
