from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgeseg.data import (
    CLASSES,
    DATASETS,
    PALETTES,
    FolderDataset,
    SegDataset,
    build_dataset,
    collate,
    read_image,
    read_label,
    reduce_zero_label,
)
from edgeseg.cli import _explain

from data_fakes import EXPECTED, H, W, label_values


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_layout_lengths_shapes_and_classes(make_tree, name):
    root = make_tree(name)
    num_classes, n_train, n_val = EXPECTED[name]
    train = build_dataset(name, root, "train")
    val = build_dataset(name, root, "val")
    assert isinstance(train, SegDataset)
    assert (len(train), len(val)) == (n_train, n_val)
    assert train.num_classes == len(train.classes) == len(train.palette) == num_classes
    assert train.ignore_index == 255
    sample = train[0]
    assert sample["img"].shape == (3, H, W) and sample["img"].dtype == torch.float32
    assert sample["gt"].shape == (H, W) and sample["gt"].dtype == torch.int64
    # transform=None: raw RGB values 0..255, exactly the decoded file.
    assert torch.equal(sample["img"], torch.from_numpy(train.load_image(0)).permute(2, 0, 1).float())
    assert torch.equal(sample["gt"], torch.from_numpy(train.load_label(0).astype(np.int64)))
    meta = sample["meta"]
    assert meta["ori_size"] == (H, W)
    assert Path(meta["img_path"]).is_file()
    assert Path(train.label_path(0)).is_file() and Path(train.label_path(0)).suffix == ".png"
    assert meta["name"] and meta["name"] in Path(meta["img_path"]).name
    assert "." not in meta["name"]  # the suffix is stripped
    assert len({train[i]["meta"]["name"] for i in range(len(train))}) == len(train)


def test_dataset_table_names():
    assert set(DATASETS) == {
        "ade20k", "cityscapes", "pascal_context", "pascal_context_59", "coco_stuff164k", "coco_stuff10k", "folder",
        "scenes",
    }


def test_class_tables_match_mmseg_sizes_and_order():
    sizes = {"ade20k": 150, "cityscapes": 19, "pascal_context": 60, "pascal_context_59": 59, "coco_stuff": 171}
    for key, n in sizes.items():
        assert len(CLASSES[key]) == len(PALETTES[key]) == n
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTES[key])
    assert CLASSES["ade20k"][:3] == ("wall", "building", "sky") and CLASSES["ade20k"][-1] == "flag"
    assert CLASSES["cityscapes"][0] == "road" and CLASSES["cityscapes"][-1] == "bicycle"
    assert CLASSES["pascal_context"] == ("background",) + CLASSES["pascal_context_59"]  # mmseg's two names
    assert CLASSES["coco_stuff"][0] == "person" and PALETTES["cityscapes"][0] == (128, 64, 128)


def test_ade20k_reduce_zero_label(make_tree):
    root = make_tree("ade20k")
    ds = build_dataset("ade20k", root, "train")
    assert ds.reduce_zero_label
    raw = label_values(0, 48)
    lab = ds.load_label(0)
    assert np.all(lab[raw == 0] == 255)
    assert np.all(lab[raw == 255] == 255)
    keep = (raw != 0) & (raw != 255)
    np.testing.assert_array_equal(lab[keep], raw[keep] - 1)
    assert lab.max() == 255 and lab[lab != 255].max() == 46


def test_root_may_be_the_parent_folder(make_tree):
    base = make_tree("ade20k")  # .../ADEChallengeData2016
    assert len(build_dataset("ade20k", base.parent, "val")) == 2
    voc = make_tree("pascal_context")  # .../VOCdevkit/VOC2010
    assert len(build_dataset("pascal_context", voc.parent.parent, "val")) == 2


def test_pascal_context_59_vs_60_and_split_files(make_tree):
    root = make_tree("pascal_context")
    c59 = build_dataset("pascal_context_59", root, "train")
    c60 = build_dataset("pascal_context", root, "train")
    assert [c59.sample_name(i) for i in range(3)] == ["2008_000000", "2008_000001", "2008_000002"]
    val = build_dataset("pascal_context_59", root, "val")
    assert [val.sample_name(i) for i in range(2)] == ["2008_000003", "2008_000004"]
    raw = label_values(0, 48)
    np.testing.assert_array_equal(c60.load_label(0), raw)  # background kept as class 0
    np.testing.assert_array_equal(c59.load_label(0), reduce_zero_label(raw))
    assert c59.reduce_zero_label and not c60.reduce_zero_label


def test_cityscapes_pairs_only_train_ids(make_tree):
    root = make_tree("cityscapes")
    ds = build_dataset("cityscapes", root, "train")
    assert [ds.sample_name(i) for i in range(len(ds))] == [
        "aachen_000000_000019", "aachen_000001_000019", "bremen_000000_000019", "bremen_000001_000019",
    ]
    assert ds.ann_files[0].endswith("aachen_000000_000019_gtFine_labelTrainIds.png")
    np.testing.assert_array_equal(ds.load_label(1), label_values(1, 19))


def test_palette_indices_are_preserved(tmp_path):
    lab = label_values(3, 40)
    path = tmp_path / "lab.png"
    im = Image.fromarray(lab)
    im.putpalette([v for i in range(256) for v in (i, 255 - i, 3)])
    im.save(path)
    assert Image.open(path).mode == "P"
    out = read_label(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, lab)


def test_rgb_label_is_rejected_with_the_path(tmp_path):
    path = tmp_path / "colour.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match="colour.png"):
        read_label(path)


@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_damaged_files_are_one_line_errors_naming_them(tmp_path, damage):
    good = tmp_path / "good.png"
    Image.fromarray(label_values(40, 40)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"hello" if damage == "not an image" else good.read_bytes()[:200])
    for read in (read_image, read_label):
        with pytest.raises(ValueError) as err:
            read(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value) and "replace or remove" in str(err.value)
    with pytest.raises(FileNotFoundError):  # a missing file stays a FileNotFoundError
        read_image(tmp_path / "missing.png")


def test_a_worker_error_reaches_the_command_line_as_its_one_line(tmp_path):
    """PyTorch re-raises a DataLoader worker's error with the worker's traceback in its message; the CLI prints
    the error's own line."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"hello")
    loader = torch.utils.data.DataLoader([bad], num_workers=1, collate_fn=lambda paths: read_image(paths[0]))
    with pytest.raises(ValueError) as err:
        next(iter(loader))
    assert "Original Traceback" in str(err.value)  # what torch raises
    line = _explain(err.value, argparse.Namespace())
    assert line.startswith(f"image {bad} could not be read") and "\n" not in line


@pytest.mark.parametrize("name", ["ade20k", "cityscapes", "pascal_context", "coco_stuff164k", "folder"])
def test_missing_folder_errors_name_the_path(tmp_path, name):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        build_dataset(name, root, "train")
    msg = str(err.value)
    assert "\n" not in msg
    assert str(root) in msg
    assert "expected" in msg or "dataset.yaml" in msg


def test_missing_label_file_names_it(make_tree):
    root = make_tree("coco_stuff164k")
    victim = root / "annotations" / "val2017" / f"{10:012d}_labelTrainIds.png"
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        build_dataset("coco_stuff164k", root, "val")


def test_root_none_and_unknown_names():
    with pytest.raises(ValueError, match="ade20k"):
        build_dataset("ade20k", None, "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", "/nonexistent", "train")
    with pytest.raises(FileNotFoundError, match="/nonexistent/ade"):
        build_dataset("ade20k", "/nonexistent/ade", "train")


def test_unknown_split_is_an_error(make_tree):
    root = make_tree("ade20k")
    with pytest.raises(ValueError, match="split"):
        build_dataset("ade20k", root, "trainval")


def test_folder_yaml_split_file_and_overrides(make_tree, tmp_path):
    root = make_tree("folder")
    ds = build_dataset("folder", root, "train")
    assert ds.classes == ("road", "car", "person", "tree")
    assert ds.palette[1] == (4, 5, 6)
    np.testing.assert_array_equal(ds.load_label(2), label_values(2, 4))
    # Flat folders + split file, reduce_zero_label from the YAML.
    flat = tmp_path / "flat"
    (flat / "imgs").mkdir(parents=True)
    (flat / "labels").mkdir()
    for i in range(4):
        Image.fromarray(np.full((H, W, 3), i, np.uint8)).save(flat / "imgs" / f"a{i}.png")
        Image.fromarray(np.full((H, W), i, np.uint8)).save(flat / "labels" / f"a{i}_mask.png")
    (flat / "train.txt").write_text("a1\na3\n")
    (flat / "dataset.yaml").write_text(
        "classes: [x, y, z]\nimg_dir: imgs\nann_dir: labels\nimg_suffix: .png\nseg_map_suffix: _mask.png\n"
        "reduce_zero_label: true\nsplits: {train: train.txt}\n"
    )
    ds = build_dataset("folder", flat, "train")
    assert len(ds) == 2 and ds.sample_name(1) == "a3"
    assert ds.load_label(0).max() == 0 and ds.load_label(1).max() == 2  # 1 -> 0, 3 -> 2
    assert len(ds.palette) == 3  # generated
    everything = FolderDataset(flat, split=None, reduce_zero_label=False)
    assert len(everything) == 4 and everything.load_label(3).max() == 3
    with pytest.raises(FileNotFoundError, match="val"):
        build_dataset("folder", flat, "val")


def test_folder_without_classes_names_the_yaml(make_tree):
    root = make_tree("folder")
    (root / "dataset.yaml").unlink()
    with pytest.raises(ValueError, match="dataset.yaml"):
        build_dataset("folder", root, "train")
    ds = build_dataset("folder", root, "train", classes=["a", "b", "c", "d"])
    assert ds.num_classes == 4
    with pytest.raises(ValueError, match=r"class names \['b'\] appear more than once"):
        build_dataset("folder", root, "train", classes=["a", "b", "c", "b"])


def test_transform_output_and_meta_are_used(make_tree):
    root = make_tree("cityscapes")

    def half(img, gt):
        return img[::2, ::2].astype(np.float32), gt[::2, ::2], {"img_shape": (H // 2, W // 2)}

    ds = build_dataset("cityscapes", root, "val", transform=half)
    s = ds[-1]
    assert s["img"].shape == (H // 2, W // 2, 3) and s["gt"].shape == (H // 2, W // 2)
    assert s["meta"]["img_shape"] == (H // 2, W // 2) and s["meta"]["ori_size"] == (H, W)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_collate_stacks_or_keeps_lists(make_tree):
    root = make_tree("cityscapes")
    ds = build_dataset("cityscapes", root, "train")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["img"].shape == (2, 3, H, W) and batch["gt"].shape == (2, H, W)
    assert [m["name"] for m in batch["meta"]] == [ds.sample_name(0), ds.sample_name(1)]
    odd = collate([{"img": torch.zeros(3, 4, 4), "gt": torch.zeros(4, 4), "meta": {}},
                   {"img": torch.zeros(3, 4, 6), "gt": torch.zeros(4, 6), "meta": {}}])
    assert isinstance(odd["img"], list) and len(odd["img"]) == 2


def test_coco_stuff10k_reduces_zero_label_and_tests_on_test2014(make_tree):
    root = make_tree("coco_stuff10k")
    ds = build_dataset("coco_stuff10k", root, "val")
    assert ds.reduce_zero_label and len(ds) == 2 and "test2014" in ds[0]["meta"]["img_path"]
    raw = np.array(Image.open(ds.img_path(0).replace("images", "annotations").replace(".jpg", "_labelTrainIds.png")))
    expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    expected[raw == 255] = 255
    assert np.array_equal(ds.load_label(0).astype(np.int64), expected)


@pytest.mark.parametrize("classes", [8, 301])
def test_label_pngs_give_their_indices_back(tmp_path, classes):
    from edgeseg.data import read_label, save_label_png
    from edgeseg.data.classes import default_palette

    label = np.array([[0, 3, 7], [7, 3, 0]]) if classes == 8 else np.array([[3, 254, 255], [256, 300, 0]])
    save_label_png(label, tmp_path / "a.png", default_palette(classes))
    assert read_label(tmp_path / "a.png").tolist() == label.tolist()
    assert Image.open(tmp_path / "a.png").mode == ("P" if classes == 8 else "I;16")


def test_unknown_dataset_arguments_are_named():
    with pytest.raises(ValueError, match=r"dataset 'scenes' takes no argument 'bogus' \(data.kwargs"):
        build_dataset("scenes", None, "train", bogus=1)


@pytest.mark.parametrize("text, message", [
    ("classes: [a, b\n", "not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'$"),
    ("classes: abc\n", "classes must be a list"),
    ("classes: [a, b]\nreduce_zero_label: 'false'\n", "reduce_zero_label must be true or false"),
    ("classes: [a, b]\npalette: [[300, 0, 0], [0, 0, 0]]\n", "values 0..255"),
    ("classes: [a, b]\nsplits: [train.txt]\n", "splits must be a mapping"),
])
def test_folder_yaml_mistakes_name_the_file_and_the_key(make_tree, text, message):
    root = make_tree("folder")
    (root / "dataset.yaml").write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        build_dataset("folder", root, "train")
    assert "dataset.yaml" in str(err.value)


def test_folder_yaml_unknown_keys_are_said_and_ignored(make_tree):
    root = make_tree("folder")
    (root / "dataset.yaml").write_text("classes: [a, b, c, d]\nname: my street scenes\n")
    with pytest.warns(UserWarning, match="unknown key 'name' ignored"):
        assert build_dataset("folder", root, "train").num_classes == 4
    with warnings.catch_warnings():  # said once: the other split reads the same file
        warnings.simplefilter("error")
        assert build_dataset("folder", root, "val").num_classes == 4
    (root / "dataset.yaml").write_text("classes: [a, b, c, d]\nreduce_zero_labels: true\n")  # a typo: refused
    with pytest.raises(ValueError, match="unknown key 'reduce_zero_labels': did you mean 'reduce_zero_label'"):
        build_dataset("folder", root, "train")


def test_sixteen_bit_grey_images_read_as_their_top_eight_bits(tmp_path):
    from edgeseg.data.datasets import read_image

    grey = np.array([[0, 256, 65535], [1000, 40000, 255]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    rgb = read_image(tmp_path / "g16.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[..., 0].tolist() == (grey >> 8).tolist() and (rgb[..., 0] == rgb[..., 2]).all()
    Image.fromarray(np.zeros((2, 2), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match="floating-point pixels"):
        read_image(tmp_path / "f.tiff")


def test_a_label_map_of_another_size_names_both_files(make_tree):
    root = make_tree("folder")
    ds = build_dataset("folder", root, "train")
    label = Path(ds.ann_files[0])
    Image.fromarray(np.zeros((3, 5), np.uint8)).save(label)
    with pytest.raises(ValueError, match=r"is 5x3: a label map has its image's size") as err:
        ds[0]
    assert str(label) in str(err.value) and str(ds.img_files[0]) in str(err.value)


def test_a_folder_of_other_images_names_their_suffix_and_the_key_to_set(make_tree):
    root = make_tree("folder")
    for image in (root / "img_dir" / "train").iterdir():
        image.rename(image.with_suffix(".png"))
    with pytest.raises(FileNotFoundError, match=r"no \*\.jpg images in .*train \(it holds 3 \*\.png files: set "
                                                r"img_suffix: \.png in dataset.yaml"):
        build_dataset("folder", root, "train")
    ade = make_tree("ade20k")  # a built-in layout's suffix is fixed: no advice to set it
    for image in (ade / "images" / "training").iterdir():
        image.rename(image.with_suffix(".png"))
    with pytest.raises(FileNotFoundError, match=r"no \*\.jpg images in \S+training; expected"):
        build_dataset("ade20k", ade, "train")


def test_images_of_another_suffix_beside_the_read_ones_are_said(make_tree):
    root = make_tree("folder")
    train = root / "img_dir" / "train"
    (train / "img0.jpg").rename(train / "img0.jpeg")
    (train / "img1.jpg").rename(train / "img1.JPG")
    with pytest.warns(UserWarning, match=r"train: 1 \*\.JPG, 1 \*\.jpeg files skipped, only \*\.jpg images are read "
                                         r"\(mmseg's img_suffix, case-sensitive\): rename them, or set img_suffix in "
                                         r"dataset.yaml$"):
        assert len(build_dataset("folder", root, "train")) == 1
    Image.new("RGB", (8, 8)).save(train / "img2.png")  # a PNG photo: labels are PNGs too, but in ann_dir
    with pytest.warns(UserWarning, match=r"1 \*\.JPG, 1 \*\.jpeg, 1 \*\.png files skipped"):
        assert len(build_dataset("folder", root, "train")) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(build_dataset("folder", root, "val")) == 2


def test_a_camera_jpeg_with_previews_reads_silently_an_animation_says_its_first_frame(tmp_path):
    big, small = Image.new("RGB", (16, 12), (200, 0, 0)), Image.new("RGB", (8, 6), (0, 200, 0))
    big.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[small])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(tmp_path / "camera.jpg").shape == (12, 16, 3)
    big.save(tmp_path / "anim.gif", save_all=True, append_images=[small.resize((16, 12))])
    with pytest.warns(UserWarning, match=r"anim.gif has 2 frames: the first is read"):
        assert read_image(tmp_path / "anim.gif").shape == (12, 16, 3)
