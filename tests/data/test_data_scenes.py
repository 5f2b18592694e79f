from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from edgeseg.data import (
    CLASSES,
    PALETTES,
    ScenesDataset,
    TrainTransform,
    build_dataset,
    collate,
    generate_scene,
    scene_rng,
    write_scenes,
)
from edgeseg.data.scenes import GRAIN, WAVES


def test_same_seed_same_scene_and_other_seed_or_split_differ():
    a = ScenesDataset(split="train", num_images=4, size=(64, 80), seed=0)
    b = ScenesDataset(split="train", num_images=4, size=(64, 80), seed=0)
    for i in range(4):
        ia, la = a.load_pair(i)
        ib, lb = b.load_pair(i)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
    assert ia.shape == (64, 80, 3) and ia.dtype == np.uint8 and la.shape == (64, 80) and la.dtype == np.uint8
    other_seed = ScenesDataset(split="train", num_images=4, size=(64, 80), seed=1)
    val = ScenesDataset(split="val", num_images=4, size=(64, 80), seed=0)
    assert not np.array_equal(a.load_image(0), other_seed.load_image(0))
    assert not np.array_equal(a.load_image(0), val.load_image(0))
    assert not np.array_equal(a.load_image(0), a.load_image(1))


def test_all_classes_appear_and_tables_agree():
    ds = build_dataset("scenes", None, "train", num_images=12, size=(96, 96))
    assert ds.classes == CLASSES["scenes"] and ds.palette == PALETTES["scenes"] and ds.num_classes == 8
    counts = sum(np.bincount(ds.load_label(i).ravel(), minlength=8) for i in range(len(ds)))
    assert counts.shape == (8,) and np.all(counts > 0)
    assert counts.sum() == 12 * 96 * 96  # no ignore pixels, no label outside 0..7


def test_sample_format_and_default_lengths():
    ds = ScenesDataset(split="val", size=(40, 56))
    assert len(ds) == 200 and len(ScenesDataset()) == 2000
    s = ds[3]
    assert s["img"].shape == (3, 40, 56) and s["img"].dtype == torch.float32
    assert 0 <= float(s["img"].min()) and float(s["img"].max()) <= 255
    assert s["gt"].shape == (40, 56) and s["gt"].dtype == torch.int64
    assert s["meta"]["ori_size"] == (40, 56) and s["meta"]["name"] == "scene_000003"


def test_pixel_colour_alone_is_not_decisive_but_texture_is():
    rng_ids = range(24)
    pixels, labels, grain_grad, waves_grad = [], [], [], []
    for i in rng_ids:
        img, lab = generate_scene(scene_rng(0, "train", i), (96, 96))
        pixels.append(img.reshape(-1, 3).astype(np.float32))
        labels.append(lab.ravel())
        grad = np.abs(np.diff(img.astype(np.float32).mean(-1), axis=1))
        inner = (lab[:, 1:] == lab[:, :-1])
        for cls, out in ((GRAIN, grain_grad), (WAVES, waves_grad)):
            m = inner & (lab[:, 1:] == cls)
            if m.sum() > 200:
                out.append(grad[m].mean())
    x, y = np.concatenate(pixels), np.concatenate(labels)
    centroids = np.stack([x[y == k].mean(0) for k in range(8)])
    nearest = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (nearest == y).mean()
    majority = np.bincount(y).max() / len(y)
    assert accuracy < majority + 0.1  # a single pixel's colour says little
    # Fine texture tells the two backgrounds apart: grain varies far more from pixel to pixel.
    assert grain_grad and waves_grad and min(grain_grad) > 2 * max(waves_grad)


def test_write_scenes_roundtrip_in_folder_layout(tmp_path):
    out = write_scenes(tmp_path / "scenes", num_train=3, num_val=2, size=(48, 64), seed=5)
    meta = yaml.safe_load((out / "dataset.yaml").read_text())
    assert meta["classes"] == list(CLASSES["scenes"]) and len(meta["palette"]) == 8
    label_png = out / "ann_dir" / "val" / "scene_000001.png"
    assert Image.open(label_png).mode == "P"
    assert (out / "img_dir" / "train" / "scene_000002.jpg").is_file()

    folder = build_dataset("folder", out, "val")
    live = ScenesDataset(split="val", num_images=2, size=(48, 64), seed=5)
    assert len(folder) == 2 and folder.classes == CLASSES["scenes"] and folder.palette == PALETTES["scenes"]
    for i in range(2):
        np.testing.assert_array_equal(folder.load_label(i), live.load_label(i))  # PNG indices are lossless
        diff = np.abs(folder.load_image(i).astype(int) - live.load_image(i).astype(int))
        assert diff.mean() < 6  # JPEG
    from_disk = ScenesDataset(root=out, split="train")
    assert len(from_disk) == 3 and from_disk.sample_name(2) == "scene_000002"
    np.testing.assert_array_equal(from_disk.load_label(0), generate_scene(scene_rng(5, "train", 0), (48, 64))[1])
    with pytest.raises(ValueError, match="3 train images"):
        ScenesDataset(root=out, split="train", num_images=10)


def test_dataloader_workers_are_reproducible_from_torch_seed():
    ds = ScenesDataset(split="train", num_images=4, size=(48, 48),
                       transform=TrainTransform((32, 32), scale=(96, 48)))

    def first_batch(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
        return next(iter(loader))["img"]

    a, b, c = first_batch(0), first_batch(0), first_batch(1)
    assert a.shape == (2, 3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
