"""Hugging Face SegFormer folders ↔ edgeseg, checked against transformers itself."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from edgeseg import create_model
from edgeseg.deploy.benchmark import random_weights_
from edgeseg.models import segformer as S
from edgeseg.models.hf_segformer import load_hf_folder, save_hf_folder, to_hf_state_dict

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

CONFIGS = {
    "b0": dict(),  # the transformers defaults are SegFormer-B0
    "b2-shaped": dict(hidden_sizes=[16, 32, 80, 128], depths=[3, 4, 6, 3], decoder_hidden_size=64),
}
X = torch.randn(2, 3, 40, 72, generator=torch.Generator().manual_seed(0))  # non-square, not a multiple of 32


def _hf_segmentation(config: str, num_labels: int = 7, seed: int = 0):
    cfg = transformers.SegformerConfig(num_labels=num_labels, **CONFIGS[config])
    cfg.id2label = {i: f"class{i}" for i in range(num_labels)}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    model = transformers.SegformerForSemanticSegmentation(cfg).eval()
    random_weights_(model, seed)
    return model


@pytest.mark.parametrize("config", list(CONFIGS))
def test_hf_folder_loads_with_identical_logits(tmp_path, config):
    hf = _hf_segmentation(config)
    hf.save_pretrained(tmp_path)
    model = load_hf_folder(tmp_path)
    with torch.no_grad():
        ref = hf(pixel_values=X).logits
        out = model(X)
    assert out.shape == ref.shape == (2, 7, 10, 18)
    assert (out - ref).abs().max().item() <= 1e-4
    assert model.class_names == [f"class{i}" for i in range(7)]
    assert model.model_name == ("segformer-b0" if config == "b0" else "segformer-b2")
    assert model.model_args["ln_eps"] == 1e-5
    # the eps we build for HF folders is the one transformers' modules actually use, everywhere
    hf_eps = {m.eps for m in hf.modules() if isinstance(m, nn.LayerNorm)}
    ours_eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    assert hf_eps == ours_eps == {1e-5}


def test_load_model_of_an_hf_weights_file_or_folder_with_overrides(tmp_path, monkeypatch):
    import edgeseg
    from edgeseg import checkpoint

    hf = _hf_segmentation("b0", num_labels=4)
    hf.save_pretrained(tmp_path)
    with torch.no_grad():
        ref = hf(pixel_values=X).logits
    # The weights file alone builds what the folder builds (transformers' LayerNorm eps), from one read of it.
    reads = []
    read = checkpoint.read_checkpoint
    monkeypatch.setattr(checkpoint, "read_checkpoint", lambda path: reads.append(path) or read(path))
    alone = edgeseg.load_model(tmp_path / "model.safetensors")
    assert len(reads) == 1
    with torch.no_grad():
        assert torch.equal(alone(X), load_hf_folder(tmp_path)(X))
        assert (alone(X) - ref).abs().max().item() <= 1e-4
    # Builder overrides apply to folders as to files; a class count the weights do not have is one clear line.
    dropped = edgeseg.load_model(tmp_path, dropout=0.5)
    assert dropped.model_args["dropout"] == 0.5 and dropped.class_names == [f"class{i}" for i in range(4)]
    with pytest.raises(ValueError, match="has 4 classes, not 7: leave the class count out"):
        edgeseg.load_model(tmp_path, num_classes=7)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_save_hf_folder_round_trips_through_transformers(tmp_path, config):
    hf = _hf_segmentation(config, seed=1)
    hf.save_pretrained(tmp_path / "src")
    model = load_hf_folder(tmp_path / "src")
    save_hf_folder(model, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not list((tmp_path / "out").glob("*.tmp"))
    reloaded = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "out").eval()
    original, again = hf.state_dict(), reloaded.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)  # weights come back bit for bit
    assert reloaded.config.id2label == hf.config.id2label
    with torch.no_grad():
        assert (reloaded(pixel_values=X).logits - hf(pixel_values=X).logits).abs().max().item() == 0.0
        assert (reloaded(pixel_values=X).logits - model(X)).abs().max().item() <= 1e-4


def test_labels_palette_normalisation_test_resize_and_window_survive_a_hf_folder(tmp_path):
    from edgeseg.checkpoint import load_model, set_labels, set_normalization, set_test_resize, set_test_windows

    model = create_model("segformer-b0", num_classes=3, depths=[1, 1, 1, 1]).eval()
    set_labels(model, ["sky", "sea", "sand"], [(0, 0, 255), (0, 128, 255), (255, 220, 150)])
    set_normalization(model, (100.0, 110.0, 120.0), (50.0, 60.0, 70.0))
    set_test_resize(model, (1024, 512), 32)
    set_test_windows(model, (512, 512), (384, 384))
    save_hf_folder(model, tmp_path / "hf")
    back = load_model(tmp_path / "hf")
    assert back.class_names == ["sky", "sea", "sand"] and back.palette == [(0, 0, 255), (0, 128, 255), (255, 220, 150)]
    assert back.input_mean == (100.0, 110.0, 120.0) and back.input_std == (50.0, 60.0, 70.0)
    assert back.test_scale == (1024, 512) and back.test_size_divisor == 32
    assert back.test_crop_size == (512, 512) and back.test_stride == (384, 384)
    assert load_model(tmp_path / "hf", num_classes=3).test_stride == (384, 384)  # rebuilt with overrides: kept too
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["edgeseg"]["test_stride"] = [768, 768]  # past its crop: malformed, left out like any other bad entry
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert load_model(tmp_path / "hf").test_crop_size is None
    # transformers reads the normalisation from preprocessor_config.json, in its units (pixels / 255)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert processor.image_mean == pytest.approx([100 / 255, 110 / 255, 120 / 255])
    assert transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "hf").config.num_labels == 3


def test_official_model_exports_to_transformers(tmp_path):
    """A model with the official eps (1e-6) computes, inside transformers (1e-5 everywhere), the same logits to
    well within the parity tolerance."""
    model = S.segformer_b0(num_classes=5)
    random_weights_(model, 2)
    model.eval()
    save_hf_folder(model, tmp_path)
    hf = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (hf(pixel_values=X).logits - model(X)).abs().max().item() <= 1e-4


def test_in_memory_hf_state_dict_converts(tmp_path):
    """transformers >= 5 names its modules differently from its files (``stages``, ``q_proj``...): both map."""
    hf = _hf_segmentation("b2-shaped", seed=3)
    sd, notes = S.convert_state_dict(hf.state_dict())
    assert any("eps 1e-5" in n for n in notes)
    name, args = S.infer_model(sd)
    model = S.MODELS[name](ln_eps=1e-5, **args).eval()
    model.load_state_dict(sd, strict=True)
    files_sd, _ = S.convert_state_dict(to_hf_state_dict(model))
    assert all(torch.equal(files_sd[k], v) for k, v in sd.items()) and files_sd.keys() == sd.keys()
    with torch.no_grad():
        assert (model(X) - hf(pixel_values=X).logits).abs().max().item() <= 1e-4


def test_bin_weights_and_imagenet_classifier(tmp_path):
    cfg = transformers.SegformerConfig(num_labels=11, hidden_sizes=[16, 32, 40, 64], depths=[1, 1, 2, 1])
    hf = transformers.SegformerForImageClassification(cfg).eval()
    random_weights_(hf, 4)
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    model = load_hf_folder(tmp_path)
    assert isinstance(model, S.MiTClassifier) and model.model_name == "mit-b0"
    with torch.no_grad():
        assert (model(X) - hf(pixel_values=X).logits).abs().max().item() <= 1e-4
    save_hf_folder(model, tmp_path / "out")
    reloaded = transformers.SegformerForImageClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (reloaded(pixel_values=X).logits - hf(pixel_values=X).logits).abs().max().item() == 0.0


def test_without_safetensors(tmp_path, monkeypatch):
    hf = _hf_segmentation("b0", seed=5)
    hf.save_pretrained(tmp_path / "st")
    model = load_hf_folder(tmp_path / "st")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import now fails as if not installed
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_hf_folder(tmp_path / "st")
    save_hf_folder(model, tmp_path / "bin")
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    assert not (tmp_path / "bin" / "model.safetensors").exists()
    again = load_hf_folder(tmp_path / "bin")
    with torch.no_grad():
        assert torch.equal(again(X), model(X))


def test_bad_folders_fail_with_one_line_messages_and_placeholder_labels_are_dropped(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "segformer"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="not 'segformer'"):
        load_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "segformer", "patch_sizes": [7, 3, 3, 5]}))
    with pytest.raises(ValueError, match="patch_sizes"):
        load_hf_folder(tmp_path)
    hf = _hf_segmentation("b0")
    hf.config.id2label = {i: f"LABEL_{i}" for i in range(7)}
    hf.save_pretrained(tmp_path / "placeholders")
    assert not hasattr(load_hf_folder(tmp_path / "placeholders"), "class_names")
    with pytest.raises(ValueError, match="before fuse"):
        save_hf_folder(S.segformer_b0().fuse(), tmp_path / "fused")


def test_config_json_that_contradicts_the_weights_is_one_line(tmp_path):
    hf = _hf_segmentation("b0", num_labels=4)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "decoder_hidden_size": 128}))
    with pytest.raises(ValueError, match="weights do not match config.json .*size mismatch"):
        load_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "id2label": ["road", "car", "sky", "tree"]}))
    with pytest.raises(ValueError, match="id2label must map class ids to names"):
        load_hf_folder(tmp_path)
