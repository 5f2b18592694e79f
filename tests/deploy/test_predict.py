"""Segmenter: the test pipeline around a model, and the predict command."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import edgeseg
from edgeseg.cli import main
from edgeseg.deploy.predict import Segmenter
from edgeseg.engine.inference import whole_inference


def test_segmenter_matches_resize_then_model_then_resize_back(tmp_path):
    torch.manual_seed(0)
    model = edgeseg.create_model("topformer-tiny", num_classes=5).eval()
    rgb = (np.random.default_rng(0).random((70, 100, 3)) * 255).astype(np.uint8)
    seg = Segmenter(model, scale=(200, 96))
    labels = seg(rgb)
    assert labels.shape == (70, 100) and labels.dtype == np.uint8 and labels.max() < 5
    img, _, _ = seg.transform(rgb)
    assert img.shape[-2:] == (96, 137)  # keep-ratio: short side 96
    with torch.inference_mode():
        expected = whole_inference(model, img[None], (70, 100)).argmax(1)[0].numpy()
    assert np.array_equal(labels, expected)
    assert seg.overlay(rgb, labels).shape == rgb.shape


def test_ade20k_sized_model_gets_ade20k_names():
    seg = Segmenter(edgeseg.create_model("topformer-tiny"))
    assert seg.class_names[0] == "wall" and len(seg.palette) == 150


def test_predict_cli_writes_palette_pngs(tmp_path):
    model = edgeseg.create_model("topformer-tiny", num_classes=4)
    ckpt = edgeseg.save_checkpoint(tmp_path / "m.pth", model)
    img = tmp_path / "a.jpg"
    Image.fromarray((np.random.default_rng(1).random((64, 80, 3)) * 255).astype(np.uint8)).save(img)
    assert main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "out"), "--scale", "128", "64"]) == 0
    label = Image.open(tmp_path / "out" / "a.png")
    assert label.mode == "P" and label.size == (80, 64) and np.array(label).max() < 4
    assert (tmp_path / "out" / "a_overlay.jpg").is_file()


def test_missing_image_is_one_line(tmp_path, capsys):
    model = edgeseg.create_model("topformer-tiny", num_classes=4)
    ckpt = edgeseg.save_checkpoint(tmp_path / "m.pth", model)
    assert main(["predict", str(ckpt), str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "out")]) == 2
    assert "nope.jpg" in capsys.readouterr().err
