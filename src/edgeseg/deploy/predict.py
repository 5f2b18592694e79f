"""Images in, label maps out: the inference wrapper a user calls without knowing the test pipeline.

``Segmenter`` applies the papers' test pipeline (keep-ratio resize, normalisation), runs the model, brings the
logits back to the original image size the way mmseg does, and returns class indices. ``colorize``/``overlay`` make
results visible.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data import CLASSES, PALETTES, TestTransform, read_image
from ..data.classes import default_palette
from ..engine.inference import predict_probs

ImageLike = str | os.PathLike | np.ndarray | Image.Image


def _as_rgb_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image '{path}' does not exist")
        return read_image(path)
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 RGB array, got {arr.dtype} {arr.shape}")
    return arr


def _dataset_for(num_classes: int) -> str | None:
    matches = [name for name, names in CLASSES.items() if len(names) == num_classes]
    return matches[0] if matches else None


class Segmenter:
    """A model plus its test pipeline.

    Args:
        model: any edgeseg segmentation model (eval mode is set here).
        scale: ``(long, short)`` keep-ratio bound of the test resize (ADE20K recipes: ``(2048, 512)``).
        size_divisor: round the resized image up to a multiple of this (SegFormer's ADE20K pipeline: 32).
        class_names, palette: for reports and colour maps; default to the dataset with the model's class count.
    """

    def __init__(self, model: nn.Module, scale: Sequence[int] = (2048, 512), size_divisor: int | None = None,
                 class_names: Sequence[str] | None = None,
                 palette: Sequence[Sequence[int]] | None = None) -> None:
        self.model = model.eval()
        self.transform = TestTransform(tuple(scale), size_divisor)
        num_classes = model.num_classes
        dataset = _dataset_for(num_classes)
        names = class_names or getattr(model, "class_names", None) or (CLASSES[dataset] if dataset else None)
        self.class_names = list(names) if names else [f"class_{i}" for i in range(num_classes)]
        self.palette = [tuple(c) for c in (palette or (PALETTES[dataset] if dataset else
                                                       default_palette(num_classes)))]

    @torch.inference_mode()
    def probabilities(self, image: ImageLike) -> torch.Tensor:
        """Class probabilities (K, H, W) at the original image size."""
        rgb = _as_rgb_array(image)
        img, _, _ = self.transform(rgb)
        return predict_probs(self.model, img[None], out_size=rgb.shape[:2])[0]

    def __call__(self, image: ImageLike) -> np.ndarray:
        """Class indices (H, W) as uint8 (int32 beyond 256 classes)."""
        labels = self.probabilities(image).argmax(0).numpy()
        return labels.astype(np.uint8 if len(self.class_names) <= 256 else np.int32)

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """H×W×3 uint8 colour image of a label map (ignored pixels white)."""
        lut = np.full((max(256, len(self.palette)), 3), 255, dtype=np.uint8)
        lut[: len(self.palette)] = np.asarray(self.palette, dtype=np.uint8)
        return lut[labels]

    def overlay(self, image: ImageLike, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """The image with the colour map blended on top."""
        rgb = _as_rgb_array(image).astype(np.float32)
        return (rgb * (1 - alpha) + self.colorize(labels).astype(np.float32) * alpha).round().astype(np.uint8)
