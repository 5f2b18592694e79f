"""`scenes`: a procedural segmentation dataset, deterministic from ``(seed, split, index)``.

Why it exists: the real benchmarks (ADE20K, Cityscapes, ...) are not available everywhere, yet training,
evaluation and deployment must be exercised end to end on data where a better model scores measurably better.
A scene needs both things the papers' architectures are built for:

- *local detail*: the two background classes ("grain": fine pixel noise, "waves": smooth oriented undulation) and
  the two textured objects ("stripes", "dots") differ by texture, not by colour;
- *context*: "disc", "square", "triangle" and "ring" share one surface texture (flat colour, soft shading, mild
  noise); a pixel in their interior is classified only by seeing the outline, i.e. with a large receptive field.

Every class draws its colour from a hue window centred on its own hue but 0.4 turns wide, so neighbouring
classes' colour distributions overlap: colour statistics help, a single pixel's colour does not decide.
Objects (3..9 per image) vary ~5× in size, may leave the frame, and occlude each other in drawing order.

Generation is numpy-vectorised and works inside each object's bounding box: a 256×256 sample takes a few ms.
Samples come on the fly (:class:`ScenesDataset`, no disk needed) or are written in the ``folder`` layout
(:func:`write_scenes`: JPEG images, palette PNG labels, ``dataset.yaml``).
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from ..fileio import atomic_write, write_text
from .classes import SCENES_CLASSES, SCENES_PALETTE
from .datasets import FolderDataset, SegDataset

GRAIN, WAVES, DISC, SQUARE, TRIANGLE, RING, STRIPES, DOTS = range(8)
OBJECT_CLASSES = (DISC, SQUARE, TRIANGLE, RING, STRIPES, DOTS)
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DEFAULT_NUM_IMAGES = {"train": 2000, "val": 200, "test": 200}


def _split_id(split: str) -> int:
    return _SPLIT_IDS.get(split, zlib.crc32(split.encode()) + 3)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one sample: independent streams per (seed, split, index), so train and val never share
    a scene and any sample can be regenerated alone."""
    return np.random.default_rng([int(seed), _split_id(split), int(index)])


def _class_colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    """An RGB colour (floats 0..255) from the class's overlapping hue window."""
    hue = (cls / len(SCENES_CLASSES) + rng.uniform(-0.2, 0.2)) % 1.0
    sat = rng.uniform(0.3, 0.85)
    val = rng.uniform(0.35, 0.95)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255.0


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys, xs


def _uniform_noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Zero-mean, unit-std noise; uniform from raw bytes because it is ~10× cheaper than normal samples."""
    raw = np.frombuffer(rng.bytes(shape[0] * shape[1]), dtype=np.uint8).reshape(shape)
    return (raw.astype(np.float32) - 127.5) * (1.0 / 73.9)


def _plane_wave(ys: np.ndarray, xs: np.ndarray, theta: float, period: float, phase: float) -> np.ndarray:
    """``sin(2π (x cosθ + y sinθ) / period + phase)`` built from 1-D sines (sin(a+b) = sin a cos b + cos a sin b)."""
    k = 2 * np.pi / period
    ax = xs * (k * np.cos(theta)) + phase
    by = ys * (k * np.sin(theta))
    return np.sin(ax) * np.cos(by) + np.cos(ax) * np.sin(by)


# ------------------------------------------------------------------------------------------------ textures
# Every texture is a per-pixel (gain, offset) pair: pixel = colour × gain + offset. Rendering the image once at
# the end from these 2-D fields keeps the per-object work 2-D and confined to the object's bounding box.
def _waves(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Smooth oriented undulation (period 20..60 px, with a second harmonic so it is not a pure sine)."""
    theta, period = rng.uniform(0, np.pi), rng.uniform(20.0, 60.0)
    amp = rng.uniform(25.0, 45.0)
    wave = _plane_wave(ys, xs, theta, period, rng.uniform(0, 2 * np.pi))
    wave += 0.35 * _plane_wave(ys, xs, theta, period / 2, rng.uniform(0, 2 * np.pi))
    return wave * amp


def _plain(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, r: float, noise: np.ndarray) -> np.ndarray:
    """The shared surface of disc/square/triangle/ring: flat colour, linear shading across the object, mild noise."""
    theta = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(10.0, 35.0) / max(r, 1.0)
    return xs * (amp * np.cos(theta)) + ys * (amp * np.sin(theta)) + noise * 6.0


def _contrast_shade(rng: np.random.Generator, colour: np.ndarray) -> tuple[float, float]:
    """(gain, offset) of the second shade of stripes/dots: darker for light colours, lighter for dark ones."""
    if colour.mean() > 110:
        return float(rng.uniform(0.35, 0.6)), 0.0
    return 1.8, 30.0


def _stripes(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Hard-edged stripes (period 6..14 px, any angle): True on the second shade."""
    theta, period = rng.uniform(0, np.pi), rng.uniform(6.0, 14.0)
    u = xs * (np.cos(theta) / period) + ys * (np.sin(theta) / period) + rng.uniform(0, 1)
    return (u - np.floor(u)) >= 0.5


def _dots(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Round dots on a square lattice (period 7..13 px, random rotation): True on the dots."""
    theta, period = rng.uniform(0, np.pi / 2), rng.uniform(7.0, 13.0)
    c, s = np.cos(theta) / period, np.sin(theta) / period
    u = xs * c + ys * s
    v = ys * c - xs * s
    du = u - np.floor(u) - 0.5
    dv = v - np.floor(v) - 0.5
    return du * du + dv * dv < rng.uniform(0.06, 0.1)


# --------------------------------------------------------------------------------------------------- shapes
def _shape_mask(rng: np.random.Generator, cls: int, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of the object's outline, coordinates relative to its centre (extent at most 1.5 r)."""
    theta = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(theta), np.sin(theta)
    u = dx * c + dy * s
    v = dy * c - dx * s
    if cls == DISC:
        return u * u + v * v < r * r
    if cls == SQUARE:
        half = 0.85 * r  # about the disc's area; half-diagonal 1.2 r
        return (np.abs(u) < half) & (np.abs(v) < half)
    if cls == TRIANGLE:
        inner = 0.75 * r  # inscribed radius; circumradius 1.5 r, area close to the disc's
        mask = u < inner
        for a in (2 * np.pi / 3, 4 * np.pi / 3):
            mask &= u * np.cos(a) + v * np.sin(a) < inner
        return mask
    if cls == RING:
        d2 = u * u + v * v
        return (d2 < r * r) & (d2 > (r * rng.uniform(0.45, 0.65)) ** 2)
    # STRIPES, DOTS: ellipses, so the outline says nothing; their texture does.
    b = r * rng.uniform(0.55, 1.0)
    return (u / r) ** 2 + (v / b) ** 2 < 1.0


def generate_scene(rng: np.random.Generator, size: tuple[int, int] = (256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``(image H×W×3 uint8 RGB, label H×W uint8)`` with labels ``0..7`` (see ``SCENES_CLASSES``)."""
    h, w = int(size[0]), int(size[1])
    if h < 8 or w < 8:
        raise ValueError(f"scene size must be at least 8x8, got {size}")
    ys, xs = _grid(h, w)
    noise = _uniform_noise(rng, (h, w))
    colours = [_class_colour(rng, GRAIN), _class_colour(rng, WAVES)]
    instance = np.zeros((h, w), dtype=np.uint8)  # index into `colours`
    gain = np.ones((h, w), dtype=np.float32)

    # Background: grain and waves on either side of a wavy boundary (or one of them alone).
    offset = noise * rng.uniform(22.0, 38.0)  # grain: strong pixel-to-pixel variation, no structure
    layout = rng.random()
    if layout >= 0.15:
        waves = _waves(rng, ys, xs) + noise * 4.0
        if layout < 0.3:
            is_waves = np.ones((h, w), dtype=bool)
        else:
            theta = rng.uniform(0, 2 * np.pi)
            short = min(h, w)
            u = (xs - w / 2) * np.cos(theta) + (ys - h / 2) * np.sin(theta)
            wiggle = _plane_wave(ys, xs, theta + np.pi / 2, rng.uniform(60, 200), rng.uniform(0, 2 * np.pi))
            is_waves = u > short * (rng.uniform(-0.3, 0.3) + rng.uniform(0.03, 0.12) * wiggle)
        np.copyto(offset, waves, where=is_waves)
        instance[is_waves] = 1
    label = instance.copy()  # GRAIN = 0, WAVES = 1

    # Objects, drawn in order: later ones occlude earlier ones.
    short = min(h, w)
    for _ in range(int(rng.integers(3, 10))):
        cls = int(OBJECT_CLASSES[rng.integers(len(OBJECT_CLASSES))])
        r = float(np.exp(rng.uniform(np.log(0.06), np.log(0.32))) * short)
        cy, cx = rng.uniform(-0.1 * h, 1.1 * h), rng.uniform(-0.1 * w, 1.1 * w)
        ext = 1.5 * r
        y0, y1 = max(int(cy - ext), 0), min(int(cy + ext) + 2, h)
        x0, x1 = max(int(cx - ext), 0), min(int(cx + ext) + 2, w)
        if y1 - y0 < 2 or x1 - x0 < 2:
            continue
        by, bx = ys[y0:y1] - cy, xs[:, x0:x1] - cx
        mask = _shape_mask(rng, cls, by, bx, r)
        if not mask.any():
            continue
        box = (slice(y0, y1), slice(x0, x1))
        colour = _class_colour(rng, cls)
        local_noise = noise[box] * 5.0
        if cls in (STRIPES, DOTS):
            second = _stripes(rng, by, bx) if cls == STRIPES else _dots(rng, by, bx)
            g, o = _contrast_shade(rng, colour)
            np.copyto(gain[box], np.where(second, np.float32(g), np.float32(1.0)), where=mask)
            np.copyto(offset[box], local_noise + np.where(second, np.float32(o), np.float32(0.0)), where=mask)
        else:
            np.copyto(gain[box], np.float32(1.0), where=mask)
            np.copyto(offset[box], _plain(rng, by, bx, r, noise[box]), where=mask)
        np.copyto(instance[box], np.uint8(len(colours)), where=mask)
        np.copyto(label[box], np.uint8(cls), where=mask)
        colours.append(colour)

    # Global illumination gradient: the same class looks different across the frame.
    theta = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(0.0, 40.0)
    c, s = amp * np.cos(theta), amp * np.sin(theta)
    offset += xs * (c / w) + ys * (s / h) - (c + s) / 2  # zero at the centre
    img = np.take(np.asarray(colours, dtype=np.float32), instance, axis=0)
    img *= gain[..., None]
    img += offset[..., None]
    return np.clip(img, 0, 255).astype(np.uint8), label


# --------------------------------------------------------------------------------------------------- dataset
class ScenesDataset(SegDataset):
    """The procedural ``scenes`` dataset (8 classes, see ``SCENES_CLASSES``).

    With ``root=None`` samples are generated on the fly from ``(seed, split, index)``; train and val draw from
    different streams. With a ``root`` written by :func:`write_scenes` the files there are read instead (the
    ``folder`` layout; ``num_images``/``size``/``seed`` are then taken from disk).

    Args:
        root: ``None`` (generate) or a folder written by :func:`write_scenes`.
        split: ``"train"``, ``"val"`` (or any other name: its own stream).
        num_images: samples in the split (default 2000 for train, 200 otherwise).
        size: ``(H, W)`` of every image.
        seed: dataset seed.
        transform: joint transform, e.g. :class:`~edgeseg.data.TrainTransform`.
    """

    classes = SCENES_CLASSES
    palette = SCENES_PALETTE

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        num_images: int | None = None,
        size: tuple[int, int] = (256, 256),
        seed: int = 0,
        transform: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(transform)
        self.split = split
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self._files: FolderDataset | None = None
        if root is not None:
            self._files = FolderDataset(root, split)
            if num_images is not None and num_images > len(self._files):
                raise ValueError(f"scenes: {root} holds {len(self._files)} {split} images, {num_images} requested")
            self.num_images = len(self._files) if num_images is None else int(num_images)
        else:
            self.num_images = int(num_images if num_images is not None else DEFAULT_NUM_IMAGES.get(split, 200))
        if self.num_images <= 0:
            raise ValueError(f"scenes: num_images must be positive, got {self.num_images}")

    def __len__(self) -> int:
        return self.num_images

    def load_pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self._files is not None:
            return self._files.load_pair(i)
        return generate_scene(scene_rng(self.seed, self.split, i), self.size)

    def load_image(self, i: int) -> np.ndarray:
        return self.load_pair(i)[0]

    def load_label(self, i: int) -> np.ndarray:
        return self.load_pair(i)[1]

    def sample_name(self, i: int) -> str:
        return self._files.sample_name(i) if self._files is not None else scene_name(i)

    def img_path(self, i: int) -> str:
        if self._files is not None:
            return self._files.img_path(i)
        return f"scenes://seed={self.seed}/{self.split}/{scene_name(i)}"


def scene_name(i: int) -> str:
    return f"scene_{i:06d}"


def save_label_png(label: np.ndarray, path: str | Path, palette: list[tuple[int, int, int]]) -> None:
    """Write class indices as a palette ("P") PNG, atomically: viewers show colours, readers get the indices back.
    Beyond 255 classes (255 marks ignored pixels in 8 bits) a 16-bit grayscale PNG: the indices, without colours."""
    if len(palette) > 255 or (label.size and int(label.max()) > 255):
        if label.size and (int(label.min()) < 0 or int(label.max()) > 65535):
            raise ValueError(f"{path}: class indices {int(label.min())}..{int(label.max())} do not fit a 16-bit PNG")
        im = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint16))
    else:
        im = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
        flat = [0] * (256 * 3)
        for k, colour in enumerate(palette):
            flat[3 * k : 3 * k + 3] = list(colour)
        flat[3 * 255 : 3 * 256] = [255, 255, 255]  # ignore
        im.putpalette(flat)
    atomic_write(path, im.save)


def write_scenes(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    size: tuple[int, int] = (256, 256),
    seed: int = 0,
    img_suffix: str = ".jpg",
    jpeg_quality: int = 95,
) -> Path:
    """Write scenes in the ``folder`` layout and return ``out_dir``::

        out_dir/img_dir/{train,val}/scene_000000.jpg    RGB (JPEG unless img_suffix=".png")
        out_dir/ann_dir/{train,val}/scene_000000.png    palette PNG of class indices
        out_dir/dataset.yaml                            classes, palette, layout, generator settings

    The images are those of ``ScenesDataset(split=..., size=size, seed=seed)`` (up to JPEG loss).
    ``dataset.yaml`` is written last, so its presence marks a complete folder.
    """
    out = Path(out_dir).expanduser()
    for split, n in (("train", num_train), ("val", num_val)):
        img_dir, ann_dir = out / "img_dir" / split, out / "ann_dir" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in range(int(n)):
            img, label = generate_scene(scene_rng(seed, split, i), size)
            name = scene_name(i)
            kw = {"quality": jpeg_quality} if img_suffix.lower() in (".jpg", ".jpeg") else {}
            atomic_write(img_dir / f"{name}{img_suffix}", lambda p, im=img, kw=kw: Image.fromarray(im).save(p, **kw))
            save_label_png(label, ann_dir / f"{name}.png", SCENES_PALETTE)
    meta = {
        "classes": list(SCENES_CLASSES),
        "palette": [list(c) for c in SCENES_PALETTE],
        "img_dir": "img_dir",
        "ann_dir": "ann_dir",
        "img_suffix": img_suffix,
        "seg_map_suffix": ".png",
        "reduce_zero_label": False,
        "generator": {"name": "scenes", "seed": int(seed), "size": [int(size[0]), int(size[1])],
                      "num_train": int(num_train), "num_val": int(num_val)},
    }
    write_text(out / "dataset.yaml", yaml.safe_dump(meta, sort_keys=False))
    return out
