"""One loader for every layout: detection, architecture inference, clear failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import edgeseg
from edgeseg.checkpoint import read_checkpoint, set_labels, unwrap_state_dict

TOPFORMER = "topformer-tiny_ade20k-150_1x3x512x512_seed0"
SEGFORMER = "segformer-b0_nvlabs_ade20k-150_1x3x512x512_seed0"


def test_load_model_builds_official_topformer_and_reproduces_logits(reference_dir, reference_input):
    model = edgeseg.load_model(reference_dir / TOPFORMER / "checkpoint.pth")
    assert model.model_name == "topformer-tiny" and model.num_classes == 150
    with torch.inference_mode():
        out = model(reference_input)
    ref = torch.load(reference_dir / TOPFORMER / "logits_native.pt", weights_only=True)
    assert (out - ref).abs().max().item() <= 1e-4


def test_load_model_builds_official_segformer(reference_dir):
    model = edgeseg.load_model(reference_dir / SEGFORMER / "checkpoint.pth")
    assert model.model_name == "segformer-b0" and model.num_classes == 150


def test_class_count_mismatch_is_one_clear_line_and_drop_head_loads_the_rest(reference_dir):
    path = reference_dir / TOPFORMER / "checkpoint.pth"
    model = edgeseg.create_model("topformer-tiny", num_classes=19)
    with pytest.raises(ValueError) as err:
        edgeseg.load_checkpoint(model, path)
    msg = str(err.value)
    assert "150" in msg and "19" in msg and "drop_head" in msg and str(path) in msg and "\n" not in msg

    report = edgeseg.load_checkpoint(model, path, drop_head=True)
    assert report.skipped_keys and report.missing_keys == [] and report.unexpected_keys == []
    official = edgeseg.load_model(path)
    kept = [k for k in model.state_dict() if k not in report.skipped_keys]
    assert all(torch.equal(model.state_dict()[k], official.state_dict()[k]) for k in kept)


def test_drop_head_keeps_the_models_own_head_where_the_files_does_not_fit(reference_dir):
    """The README's fine-tuning example: the ADE20K TopFormer-Tiny into the Tiny-Cityscapes config (19 classes, a
    dense fuse conv where the ADE20K head's is depthwise)."""
    path = reference_dir / TOPFORMER / "checkpoint.pth"
    model = edgeseg.create_model("topformer-tiny", num_classes=19, head_depthwise=False)
    with pytest.raises(ValueError, match=r"has 150 classes but the model has 19 and another decode head \(e.g. "
                                         r"head.linear_fuse.conv.weight: "
                                         r"\[128, 1, 1, 1\] vs \[128, 128, 1, 1\]\): pass drop_head=True"):
        edgeseg.load_checkpoint(model, path)
    report = edgeseg.load_checkpoint(model, path, drop_head=True)
    assert sorted(report.skipped_keys) == ["head.conv_seg.bias", "head.conv_seg.weight", "head.linear_fuse.conv.weight"]
    assert report.missing_keys == [] and report.unexpected_keys == []
    official = edgeseg.load_model(path).state_dict()
    assert all(torch.equal(v, official[k]) for k, v in model.state_dict().items() if k not in report.skipped_keys)
    # a backbone that does not fit is never dropped
    with pytest.raises(ValueError, match="does not fit topformer-small"):
        edgeseg.load_checkpoint(edgeseg.create_model("topformer-small", num_classes=19), path, drop_head=True)


def test_a_damaged_or_headless_file_is_named_with_a_fix_the_command_line_can_follow(tmp_path):
    """``load_model`` (what every command calls) never suggests ``drop_head``, an API argument; a classifier edited
    to another width is another head, not "3 classes but the model has 3"."""
    tiny = edgeseg.create_model("topformer-tiny", num_classes=3)
    edgeseg.save_checkpoint(tmp_path / "edited.pth", tiny)
    ckpt = torch.load(tmp_path / "edited.pth", weights_only=True)
    ckpt["model_args"] = {"num_classes": 19}
    torch.save(ckpt, tmp_path / "args.pth")
    with pytest.raises(ValueError, match=r"^checkpoint '.*args.pth' has 3 classes but the model has 19: its tensors "
                                         r"are not those of that model \(a damaged or edited file\?\)$"):
        edgeseg.load_model(tmp_path / "args.pth")
    sd = dict(tiny.state_dict())
    sd["head.conv_seg.weight"] = torch.zeros(3, 64, 1, 1)  # the classifier's input width edited
    with pytest.raises(ValueError, match=r"has another decode head \(e.g. head.conv_seg.weight: \[3, 64, 1, 1\] vs "
                                         r"\[3, 128, 1, 1\]\): pass drop_head=True"):
        edgeseg.load_checkpoint(tiny, _saved(tmp_path / "width.pth", sd))
    ckpt["model_args"] = {"num_classes": 3}
    first = next(k for k, v in ckpt["state_dict"].items() if v.ndim == 4)  # a backbone conv edited
    ckpt["state_dict"][first] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"^checkpoint '.*backbone.pth' does not fit topformer-tiny: 1 tensors differ "
                                         r"in shape .*: its tensors are not those of that model \(a damaged or edited "
                                         r"file\?\)$"):
        edgeseg.load_model(_saved(tmp_path / "backbone.pth", ckpt))
    headless = {k: v for k, v in tiny.state_dict().items() if not k.startswith("head.")}
    with pytest.raises(ValueError, match=r"^checkpoint '.*headless.pth': TopFormer-tiny weights without a head .*: a "
                                         r"backbone starts a training run \(model.pretrained\), it cannot segment$"):
        edgeseg.load_model(_saved(tmp_path / "headless.pth", headless))
    with pytest.raises(ValueError, match=r"^checkpoint '.*list.pth' holds a list, not a state dict: pass a file saved "
                                         r"from model.state_dict\(\) or by edgeseg, mmseg or Hugging Face$"):
        edgeseg.load_model(_saved(tmp_path / "list.pth", [1, 2, 3]))


def _saved(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_drop_head_stays_strict_about_the_rest(tmp_path):
    sd = edgeseg.create_model("topformer-tiny", num_classes=150).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("injection.1.")}  # a backbone block missing
    torch.save({"state_dict": sd}, tmp_path / "damaged.pth")
    with pytest.raises(ValueError, match="15 missing keys"):
        edgeseg.load_checkpoint(edgeseg.create_model("topformer-tiny", num_classes=19), tmp_path / "damaged.pth",
                                drop_head=True)


def test_family_mismatch_names_both(reference_dir):
    segformer = edgeseg.create_model("segformer-b0")
    with pytest.raises(ValueError, match="TopFormer.*segformer-b0"):
        edgeseg.load_checkpoint(segformer, reference_dir / TOPFORMER / "checkpoint.pth")
    topformer = edgeseg.create_model("topformer-tiny")
    with pytest.raises(ValueError, match="SegFormer.*topformer-tiny"):
        edgeseg.load_checkpoint(topformer, reference_dir / SEGFORMER / "checkpoint.pth")


def test_variant_mismatch_points_to_load_model(reference_dir):
    model = edgeseg.create_model("topformer-small")
    with pytest.raises(ValueError, match="topformer-tiny.*load_model"):
        edgeseg.load_checkpoint(model, reference_dir / TOPFORMER / "checkpoint.pth")


@pytest.mark.parametrize("name", ["topformer-tiny", "segformer-b0"])
def test_edgeseg_checkpoint_round_trip(tmp_path: Path, name: str):
    model = edgeseg.create_model(name, num_classes=7).eval()
    path = edgeseg.save_checkpoint(tmp_path / "m.pth", model, extra={"iteration": 3})
    assert not list(tmp_path.glob(".*.tmp")), "atomic save left a temporary file"
    again = edgeseg.load_model(path)
    assert again.model_name == name and again.num_classes == 7
    assert read_checkpoint(path)["iteration"] == 3
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        assert torch.equal(model(x), again(x))


def test_class_names_and_palette_travel_with_the_model(tmp_path: Path):
    model = set_labels(edgeseg.create_model("topformer-tiny", num_classes=3), ["sky", "road", "car"],
                       [[0, 0, 255], (128, 64, 128), [0, 0, 142]])
    again = edgeseg.load_model(edgeseg.save_checkpoint(tmp_path / "m.pth", model))
    assert again.class_names == ["sky", "road", "car"]
    assert again.palette == [(0, 0, 255), (128, 64, 128), (0, 0, 142)]
    # mmseg 0.x (official releases: meta.CLASSES / meta.PALETTE) and 1.x (meta.dataset_meta) files
    weights = model.state_dict()
    for meta in ({"CLASSES": ("a", "b", "c"), "PALETTE": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]},
                 {"dataset_meta": {"classes": ("a", "b", "c"), "palette": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]}}):
        torch.save({"meta": meta, "state_dict": weights}, tmp_path / "mmseg.pth")
        loaded = edgeseg.load_model(tmp_path / "mmseg.pth")
        assert loaded.class_names == ["a", "b", "c"] and loaded.palette == [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    # labels that do not fit the class count are not attached
    torch.save({"meta": {"CLASSES": ("a", "b")}, "state_dict": weights}, tmp_path / "wrong.pth")
    assert getattr(edgeseg.load_model(tmp_path / "wrong.pth"), "class_names", None) is None


def test_imagenet_backbone_into_segmentation_model(tmp_path: Path):
    cls = edgeseg.create_model("topformer-tiny-cls")
    torch.save({"state_dict_ema": cls.state_dict()}, tmp_path / "topformer-T-224-66.2.pth")
    seg = edgeseg.create_model("topformer-tiny")
    report = edgeseg.load_checkpoint(seg, tmp_path / "topformer-T-224-66.2.pth")
    assert report.skipped_keys and all(k.startswith("head") or "classifier" in k for k in report.skipped_keys)
    shared = [k for k in seg.state_dict() if k in cls.state_dict()]
    assert len(shared) > 100
    assert all(torch.equal(seg.state_dict()[k], cls.state_dict()[k]) for k in shared)


def test_ddp_prefix_and_wrappers_are_unwrapped():
    sd = {"module.a": torch.zeros(1), "module.b": torch.ones(1)}
    out = unwrap_state_dict({"state_dict": sd})
    assert set(out) == {"a", "b"} and torch.equal(out["b"], torch.ones(1)) and torch.equal(out["a"], torch.zeros(1))


@pytest.mark.parametrize("content", [b"not a torch file", None])
def test_bad_files_give_one_line_errors(tmp_path: Path, content):
    path = tmp_path / "bad.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        edgeseg.load_model(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unknown_layout_is_named(tmp_path: Path):
    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="match no supported layout"):
        edgeseg.load_model(tmp_path / "x.pth")


def test_official_imagenet_file_layout_loads_backbone_into_segmentation_model(reference_dir, tmp_path: Path):
    """An official ``topformer-T-224-*.pth``: bare backbone keys under ``state_dict_ema`` + ``head.bn``/``head.l``."""
    official = torch.load(reference_dir / TOPFORMER / "checkpoint.pth", weights_only=True)["state_dict"]
    bare = {k[len("backbone."):]: v for k, v in official.items()
            if k.startswith("backbone.") and not k.startswith("backbone.SIM")}
    dim = 16 + 32 + 64 + 96
    bare.update({"head.bn.weight": torch.ones(dim), "head.bn.bias": torch.zeros(dim),
                 "head.bn.running_mean": torch.zeros(dim), "head.bn.running_var": torch.ones(dim),
                 "head.bn.num_batches_tracked": torch.tensor(0), "head.l.weight": torch.randn(1000, dim),
                 "head.l.bias": torch.zeros(1000)})
    path = tmp_path / "topformer-T-224-66.2.pth"
    torch.save({"state_dict_ema": bare, "state_dict": {}}, path)

    cls = edgeseg.load_model(path)
    assert cls.model_name == "topformer-tiny-cls" and cls.num_classes == 1000

    seg = edgeseg.create_model("topformer-tiny")
    report = edgeseg.load_checkpoint(seg, path)
    assert report.skipped_keys and all(k.startswith("head.") for k in report.skipped_keys)
    assert report.missing_keys and all(k.startswith(("head.", "injection.")) for k in report.missing_keys)
    reference = edgeseg.load_model(reference_dir / TOPFORMER / "checkpoint.pth").state_dict()
    backbone = [k for k in seg.state_dict() if k.startswith(("token_pyramid.", "extractor."))]
    assert len(backbone) > 300
    assert all(torch.equal(seg.state_dict()[k], reference[k]) for k in backbone)


def test_a_model_built_from_its_class_saves_and_loads(tmp_path):
    from edgeseg.models.segformer import SHARED, VARIANTS, SegFormer

    torch.manual_seed(0)
    model = SegFormer(**SHARED, **VARIANTS["b0"], num_classes=4).eval()  # no registered name: "segformer"
    edgeseg.save_checkpoint(tmp_path / "own.pth", model)
    again = edgeseg.load_model(tmp_path / "own.pth")  # rebuilt from its tensors, as a foreign layout is
    assert again.model_name == "segformer-b0" and again.num_classes == 4
    report = edgeseg.load_checkpoint(model, tmp_path / "own.pth")
    assert report.family == "SegFormer" and report.missing_keys == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    with pytest.raises(ValueError, match="unknown model 'segformer-b9'"):
        edgeseg.models.family_of("segformer-b9")


def test_a_checkpoint_with_head_counts_the_tensors_cannot_show_loads_back(tmp_path):
    # 128 channels in 4 heads (not the official 5): only the checkpoint's model_args know it
    model = edgeseg.create_model("segformer-b0", num_classes=3, embed_dims=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                                 num_heads=[2, 2, 4, 8]).eval()
    edgeseg.save_checkpoint(tmp_path / "heads.pth", model)
    again = edgeseg.load_model(tmp_path / "heads.pth")
    assert again.model_args["num_heads"] == [2, 2, 4, 8]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    # its class count still reads off the classifier: another dataset's model of this shape loads with drop_head
    other = edgeseg.create_model("segformer-b0", num_classes=19, embed_dims=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                                 num_heads=[2, 2, 4, 8])
    report = edgeseg.load_checkpoint(other, tmp_path / "heads.pth", drop_head=True)
    assert report.skipped_keys and report.missing_keys == []


def test_an_override_that_changes_nothing_is_not_blamed(tmp_path):
    sd = edgeseg.create_model("topformer-tiny", num_classes=5).state_dict()
    torch.save({"state_dict": {**sd, "decode_head.stray.weight": torch.zeros(1)}}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="1 unexpected"):
        edgeseg.load_model(tmp_path / "extra.pth", num_classes=5)



def test_a_dynamic_checkpoint_takes_another_sparsity_and_a_dense_one_is_refused(tmp_path):
    """A dynamic model re-pruned at load: an edgeseg file whose args record no sparsity (a TopFormer built with
    dynamic=True) and bare state dicts (architecture read off the tensors) are dynamic too; a dense file is
    refused in one line."""
    files = {
        "topformer": edgeseg.save_checkpoint(tmp_path / "t.pth", edgeseg.create_model("topformer-tiny", dynamic=True)),
        "raw_topformer": tmp_path / "rt.pth", "raw_dyna": tmp_path / "rd.pth"}
    torch.save(edgeseg.create_model("topformer-tiny", dynamic=True).state_dict(), files["raw_topformer"])
    torch.save(edgeseg.create_model("dynasegformer-b0", num_classes=4).state_dict(), files["raw_dyna"])
    for path in files.values():
        assert edgeseg.load_model(path, sparsity=0.5).model_args["sparsity"] == 0.5
    dense = edgeseg.save_checkpoint(tmp_path / "d.pth", edgeseg.create_model("topformer-tiny"))
    with pytest.raises(ValueError, match="holds topformer-tiny, a dense model: a sparsity needs a dynamic"):
        edgeseg.load_model(dense, sparsity=0.5)

def test_malformed_entries_beside_sound_weights_name_the_file_and_counts_must_be_positive(tmp_path):
    from edgeseg.checkpoint import atomic_save, load_model

    saved = edgeseg.save_checkpoint(tmp_path / "m.pth", edgeseg.create_model("topformer-tiny", num_classes=4))
    ckpt = torch.load(saved, weights_only=True)
    atomic_save({**ckpt, "input_mean": [0, 0, 0], "input_std": [0, 0, 0]}, tmp_path / "std0.pth")
    with pytest.raises(ValueError, match=r"checkpoint '.*std0.pth': its test pipeline is malformed .*std positive"):
        load_model(tmp_path / "std0.pth")
    atomic_save({**ckpt, "model_args": "x"}, tmp_path / "args.pth")
    with pytest.raises(ValueError, match=r"checkpoint '.*args.pth': model_args is 'x', not a mapping"):
        load_model(tmp_path / "args.pth")
    for bad in (0, -3, 2.5, "19", True):
        with pytest.raises(ValueError, match="num_classes must be an integer ≥ 1 for topformer-tiny"):
            edgeseg.create_model("topformer-tiny", num_classes=bad)
    assert edgeseg.create_model("topformer-tiny", num_classes=np.int64(7)).num_classes == 7
    assert edgeseg.create_model("mit-b0", num_classes=0).num_classes == 0  # timm's bare backbone
