"""Tiny fake dataset trees in each real on-disk layout (32×48 images written with Pillow, palette PNG labels).

Used by tests/data (fixture `make_tree`, re-exported by conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

H, W = 32, 48


def write_image(path: Path, seed: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)
    return img


def write_label(path: Path, label: np.ndarray) -> None:
    """A palette PNG whose colours differ from the indices, so reading colours instead of indices is caught."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label.astype(np.uint8))
    im.putpalette([v for i in range(256) for v in (255 - i, (7 * i) % 256, 99)])
    im.save(path)


def label_values(seed: int, high: int) -> np.ndarray:
    """Labels covering 0..high-1 plus some 255 (ignore)."""
    rng = np.random.default_rng(1000 + seed)
    lab = rng.integers(0, high, (H, W)).astype(np.uint8)
    lab[0, :high] = np.arange(high)  # every value present at least once (high <= W)
    lab[1, :3] = 255
    return lab


def _ade(root: Path) -> Path:
    base = root / "ADEChallengeData2016"
    for sub, n in (("training", 3), ("validation", 2)):
        for i in range(n):
            stem = f"ADE_{sub[:5]}_{i:08d}"
            write_image(base / "images" / sub / f"{stem}.jpg", i)
            write_label(base / "annotations" / sub / f"{stem}.png", label_values(i, 48))
    return base


def _cityscapes(root: Path) -> Path:
    for split, cities in (("train", ("aachen", "bremen")), ("val", ("frankfurt",))):
        for c, city in enumerate(cities):
            for i in range(2):
                stem = f"{city}_{i:06d}_000019"
                write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 10 * c + i)
                write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", label_values(i, 19))
                # Other gtFine files that must not be picked up.
                write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_values(i, 34))
    return root


def _pascal_context(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2010"
    stems = [f"2008_{i:06d}" for i in range(5)]
    for i, stem in enumerate(stems):
        write_image(base / "JPEGImages" / f"{stem}.jpg", i)
        write_label(base / "SegmentationClassContext" / f"{stem}.png", label_values(i, 48))
    # An image without context annotation and outside both splits (VOC has many).
    write_image(base / "JPEGImages" / "2008_999999.jpg", 99)
    sets = base / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(stems[:3]) + "\n")
    (sets / "val.txt").write_text("\n".join(stems[3:]) + "\n")
    return base


def _coco_stuff(root: Path) -> Path:
    for split, n in (("train2017", 3), ("val2017", 2)):
        for i in range(n):
            stem = f"{i + 9:012d}"
            write_image(root / "images" / split / f"{stem}.jpg", i)
            write_label(root / "annotations" / split / f"{stem}_labelTrainIds.png", label_values(i, 48))
            # mmseg's converter also leaves the raw *_labelTrainIds-less files elsewhere; only the suffix counts.
    return root


def _coco_stuff10k(root: Path) -> Path:
    for split, n in (("train2014", 3), ("test2014", 2)):
        for i in range(n):
            stem = f"COCO_{split}_{i:012d}"
            write_image(root / "images" / split / f"{stem}.jpg", i)
            write_label(root / "annotations" / split / f"{stem}_labelTrainIds.png", label_values(i, 48))
    return root


def _folder(root: Path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            write_image(root / "img_dir" / split / f"img{i}.jpg", i)
            write_label(root / "ann_dir" / split / f"img{i}.png", label_values(i, 4))
    (root / "dataset.yaml").write_text(
        "classes: [road, car, person, tree]\npalette: [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]\n"
    )
    return root


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "ade20k": _ade,
    "cityscapes": _cityscapes,
    "pascal_context": _pascal_context,
    "pascal_context_59": _pascal_context,
    "coco_stuff164k": _coco_stuff,
    "coco_stuff10k": _coco_stuff10k,
    "folder": _folder,
}

# name -> (num classes, train length, val length)
EXPECTED = {
    "ade20k": (150, 3, 2),
    "cityscapes": (19, 4, 2),
    "pascal_context": (60, 3, 2),
    "pascal_context_59": (59, 3, 2),
    "coco_stuff164k": (171, 3, 2),
    "coco_stuff10k": (171, 3, 2),
    "folder": (4, 3, 2),
}


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[[str], Path]:
    """``make_tree(name)`` writes the fake tree for dataset ``name`` and returns the root to pass to it."""

    def make(name: str) -> Path:
        root = tmp_path / name
        root.mkdir()
        return BUILDERS[name](root)

    return make
