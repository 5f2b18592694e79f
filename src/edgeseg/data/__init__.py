"""Data: mmseg dataset layouts, the papers' train/test pipelines, palettes, and the procedural ``scenes`` set.

``data`` knows no model. Typical use::

    from edgeseg.data import build_dataset, TrainTransform, TestTransform, collate

    train = build_dataset("ade20k", "data/ade/ADEChallengeData2016", "train", TrainTransform((512, 512)))
    val = build_dataset("ade20k", "data/ade/ADEChallengeData2016", "val", TestTransform((2048, 512), 32))
    toy = build_dataset("scenes", None, "train", TrainTransform((256, 256), scale=(512, 256)), size=(256, 256))
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .classes import CLASSES, PALETTES
from .datasets import (
    ADE20KDataset,
    CityscapesDataset,
    COCOStuff10kDataset,
    COCOStuff164kDataset,
    FileSegDataset,
    FolderDataset,
    IMAGE_SUFFIXES,
    PascalContext59Dataset,
    PascalContextDataset,
    SegDataset,
    collate,
    pil_to_rgb,
    read_image,
    read_label,
    reduce_zero_label,
)
from .scenes import ScenesDataset, generate_scene, save_label_png, scene_rng, write_scenes
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotoMetricDistortion,
    TestTransform,
    TrainTransform,
    rescale_size,
    resize_bilinear,
    resize_nearest,
    worker_rng,
)

# A plain dict, not a registry: the name a config gives maps straight to the class.
DATASETS: dict[str, type[SegDataset]] = {
    "ade20k": ADE20KDataset,
    "cityscapes": CityscapesDataset,
    "pascal_context": PascalContextDataset,
    "pascal_context_59": PascalContext59Dataset,
    "coco_stuff164k": COCOStuff164kDataset,
    "coco_stuff10k": COCOStuff10kDataset,
    "folder": FolderDataset,
    "scenes": ScenesDataset,
}


def build_dataset(
    name: str, root: str | Path | None, split: str, transform: Callable[..., Any] | None = None, **kwargs: Any
) -> SegDataset:
    """``DATASETS[name](root=root, split=split, transform=transform, **kwargs)`` with a clear error for unknown
    names. ``root`` may be None only for ``scenes`` (generated on the fly)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    import inspect

    accepted = inspect.signature(DATASETS[name]).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        raise ValueError(f"dataset {name!r} takes no argument {', '.join(map(repr, unknown))} (data.kwargs, "
                         f"train_kwargs, val_kwargs); it takes {', '.join(k for k in accepted if k != 'self')}")
    return DATASETS[name](root=root, split=split, transform=transform, **kwargs)


__all__ = [
    "ADE20KDataset",
    "CLASSES",
    "COCOStuff10kDataset",
    "COCOStuff164kDataset",
    "CityscapesDataset",
    "DATASETS",
    "FileSegDataset",
    "FolderDataset",
    "IMAGE_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PALETTES",
    "PascalContext59Dataset",
    "PascalContextDataset",
    "PhotoMetricDistortion",
    "ScenesDataset",
    "SegDataset",
    "TestTransform",
    "TrainTransform",
    "build_dataset",
    "collate",
    "generate_scene",
    "pil_to_rgb",
    "read_image",
    "read_label",
    "reduce_zero_label",
    "rescale_size",
    "resize_bilinear",
    "resize_nearest",
    "save_label_png",
    "scene_rng",
    "worker_rng",
    "write_scenes",
]
