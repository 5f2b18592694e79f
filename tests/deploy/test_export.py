"""ONNX export: the inference form of every family, checked with onnxruntime; atomic writes; one-line errors."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch

import edgeseg
from edgeseg import create_model, load_model
from edgeseg.checkpoint import set_labels
from edgeseg.cli import main
from edgeseg.deploy import export as export_module
from edgeseg.deploy.export import export_onnx
from edgeseg.models import dynamic

pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


def test_official_topformer_exports_fused_and_matches(reference_dir, tmp_path):
    """Official TopFormer-Tiny weights (random but realistic BN statistics), small input: onnxruntime computes what
    PyTorch computes, for the fused and the eager form, batch 2."""
    model = load_model(reference_dir / "topformer-tiny_ade20k-150_1x3x512x512_seed0" / "checkpoint.pth")
    res = export_onnx(model, tmp_path / "sub" / "t.onnx", input_size=(128, 192), batch=2)
    assert res.path.is_file() and res.fused and res.input_shape == (2, 3, 128, 192)
    assert res.output_shape == (2, 150, 16, 24)
    assert res.max_abs_diff is not None and res.max_abs_diff <= 1e-4 and res.argmax_agreement == 1.0
    assert {"Conv", "MatMul", "Softmax"} <= set(res.ops)
    eager = export_onnx(model, tmp_path / "e.onnx", input_size=(64, 64), fuse=False)
    assert not eager.fused and eager.max_abs_diff <= 1e-4
    with pytest.raises(ValueError, match=r"multiples of 64.*got 96x128: e.g. --size 128 128"):
        export_onnx(model, tmp_path / "odd.onnx", input_size=(96, 128))


def test_dynamic_models_export_their_gathered_path(tmp_path):
    torch.manual_seed(0)
    for model in (create_model("dynasegformer-b0", num_classes=5, sparsity=0.3, depths=[1, 1, 1, 1]),
                  create_model("topformer-tiny", num_classes=5, sparsity=0.3)):
        # trained gates do not tie; fresh ones (G ≡ 1) would leave the choice to the runtime
        dynamic.random_gates_(model)
        # 128²: SegFormer decoders run in row bands there in eager mode, the export traces one whole pass
        set_labels(model, list("abcde"), [(i, 2 * i, 3 * i) for i in range(5)])
        res = export_onnx(model.eval(), tmp_path / f"{model.model_name}.onnx", input_size=(128, 128))
        assert {"TopK", "Gather"} <= set(res.ops), model.model_name
        # fused DynaSegFormer ~1e-6 from ONNX Runtime, the fused TopFormer's folded BNs ~1e-5
        assert res.max_abs_diff <= (1e-5 if "segformer" in model.model_name else 5e-5), model.model_name
        # what a runtime needs beside the graph travels in it (the fused form kept the model's labels)
        meta = onnxruntime.InferenceSession(str(res.path)).get_modelmeta().custom_metadata_map
        assert json.loads(meta["class_names"]) == list("abcde") and json.loads(meta["palette"])[4] == [4, 8, 12]
        assert meta["edgeseg_model"] == model.model_name and json.loads(meta["input_std_rgb"])[0] == 58.395
        assert int(meta["logits_stride"]) == (4 if "segformer" in model.model_name else 8)


def test_segformer_exports_with_free_batch_and_size(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("segformer-b0", num_classes=5, depths=[1, 1, 1, 1]).eval()
    res = export_onnx(model, tmp_path / "free.onnx", input_size=(128, 96), dynamic=True)
    assert res.dynamic and res.max_abs_diff <= 1e-4  # checked at (1, 3, 128, 96) and (2, 3, 160, 192)
    session = onnxruntime.InferenceSession(str(res.path))
    x = torch.randn(3, 3, 77, 301)  # any other batch and size, even odd ones
    with torch.no_grad():
        want = model.fuse()(x)
    got = session.run(None, {"image": x.numpy()})[0]
    assert got.shape == (3, 5, 20, 76) and abs(got - want.numpy()).max() <= 1e-4
    # what cannot leave its sizes free says so in one line
    for name, kwargs in (("topformer-tiny", {}), ("dynasegformer-b0", {"sparsity": 0.3})):
        path = edgeseg.save_checkpoint(tmp_path / f"{name}.pth", create_model(name, num_classes=5, **kwargs))
        assert main(["export", str(path), str(tmp_path / "x.onnx"), "--size", "128", "128", "--dynamic"]) == 2
        err = capsys.readouterr().err
        assert "cannot export with free sizes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_dynamo_exporter(reference_dir, tmp_path, capfd):
    """torch.export-based export (torch's default exporter since 2.9): the official TopFormer-Tiny weights and a
    dynamic model's gathered path compute in onnxruntime what they compute in PyTorch."""
    pytest.importorskip("onnxscript")
    model = load_model(reference_dir / "topformer-tiny_ade20k-150_1x3x512x512_seed0" / "checkpoint.pth")
    res = export_onnx(model, tmp_path / "t.onnx", input_size=(128, 192), batch=2, opset=18, exporter="dynamo")
    assert res.output_shape == (2, 150, 16, 24) and res.max_abs_diff <= 1e-4 and res.argmax_agreement == 1.0
    torch.manual_seed(0)
    student = dynamic.random_gates_(create_model("dynasegformer-b0", num_classes=5, sparsity=0.3,
                                                 depths=[1, 1, 1, 1])).eval()
    res = export_onnx(student, tmp_path / "d.onnx", input_size=(128, 128), opset=18, exporter="dynamo")
    assert {"TopK", "Gather"} <= set(res.ops) and res.max_abs_diff <= 1e-4
    assert capfd.readouterr().err == ""  # torch's registry chatter and FutureWarnings stay quiet
    with pytest.raises(ValueError, match="dynamo exporter writes these models at opsets 18 to"):
        export_onnx(model, tmp_path / "x.onnx", input_size=(64, 64), exporter="dynamo")
    with pytest.raises(ValueError, match="torchscript exporter writes these models at opsets 11 to 20, not 5"):
        export_onnx(model, tmp_path / "x.onnx", input_size=(64, 64), opset=5)
    assert main(["export", "segformer-b0", str(tmp_path / "s.onnx"), "--size", "64", "64", "--exporter", "dynamo",
                 "--no-check"]) == 0
    assert "opset 18" in capfd.readouterr().out


def test_cli_export_and_errors(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.onnx"
    code = main(["export", "segformer-b0", str(out), "--size", "64", "64", "--num-classes", "7", "--no-check"])
    assert code == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "segformer-b0 (fused, 1x3x64x64 -> 1x7x16x16, opset 17)" in printed and "onnxruntime" not in printed

    # a failing export leaves neither the file nor a temporary one behind
    def broken(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(create_model("topformer-tiny"), tmp_path / "x.onnx", input_size=(64, 64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx"]

    # without the onnx extra: one line naming the fix
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx":
            raise ImportError("No module named 'onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    code = main(["export", "topformer-tiny", str(tmp_path / "y.onnx"), "--size", "64", "64"])
    err = capsys.readouterr().err
    assert code == 2 and export_module.ONNX_EXTRA in err and len(err.strip().splitlines()) == 1
    assert not Path(tmp_path / "y.onnx").exists()
