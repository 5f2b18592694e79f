"""`edgeseg convert`: weights move both ways between layouts with identical outputs."""

from __future__ import annotations

import pytest
import torch

import edgeseg
from edgeseg.cli import main

SEGFORMER = "segformer-b0_nvlabs_ade20k-150_1x3x512x512_seed0"


def test_official_segformer_to_hf_folder_loads_in_transformers(reference_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    src = reference_dir / SEGFORMER / "checkpoint.pth"
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "hf").eval()
    ours = edgeseg.load_model(src)
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        diff = (hf(pixel_values=x).logits - ours(x)).abs().max().item()
    # HF's patch-embed/stage LayerNorm eps conventions differ from NVlabs' by at most 1e-5 in eps.
    assert diff <= 1e-4

    # and back: the HF folder converts to an edgeseg checkpoint that reproduces the same logits
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.pth")]) == 0
    back = edgeseg.load_model(tmp_path / "back.pth")
    with torch.inference_mode():
        assert (back(x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-5


def test_convert_rejects_unknown_files(tmp_path, capsys):
    bad = tmp_path / "x.pth"
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, bad)
    assert main(["convert", str(bad), str(tmp_path / "y.pth")]) == 2
    err = capsys.readouterr().err
    assert "x.pth" in err and len(err.strip().splitlines()) == 1
    edgeseg.save_checkpoint(tmp_path / "top.pth", edgeseg.create_model("topformer-tiny", num_classes=5))
    assert main(["convert", str(tmp_path / "top.pth"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "topformer-tiny" in err and "--to edgeseg" in err and len(err.strip().splitlines()) == 1
