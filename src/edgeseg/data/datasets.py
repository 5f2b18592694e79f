"""Segmentation datasets in mmseg 0.x's on-disk layouts, one class per layout.

Every dataset yields ``dict(img, gt, meta)``:

- ``img``: float32 ``3×H×W`` -- normalised by the transform, or the raw RGB values 0..255 when ``transform=None``
  (so evaluation code can apply its own resizing);
- ``gt``: int64 ``H×W`` train ids, 255 = ignore;
- ``meta``: ``name`` (file stem), ``ori_size`` ``(h, w)`` of the original image, ``img_path``, plus whatever the
  transform reports (e.g. ``img_shape``).

Labels are read with Pillow as stored -- a palette ("P") PNG gives its palette *indices*, never its colours --
then, for datasets whose label 0 means "unlabelled" (ADE20K, Pascal-Context-59, COCO-Stuff-10k), mmseg's
``reduce_zero_label`` maps 0 → 255 and every other value v → v − 1 (255 stays 255).
"""

from __future__ import annotations

import collections
import difflib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..fileio import read_yaml, walk_files
from .classes import CLASSES, PALETTES, default_palette

Transform = Callable[..., Any]


# ------------------------------------------------------------------------------------------------ file reading
@contextmanager
def _opened(path: str | Path, what: str) -> Iterator[Image.Image]:
    """``Image.open`` whose failures on a damaged or non-image file (Pillow's ``UnidentifiedImageError``, a
    truncated file) are one-line ``ValueError``s naming the file: in a DataLoader worker, thousands of files deep
    into a run, the traceback alone would not say which file to replace."""
    try:
        with Image.open(path) as im:
            im.load()
            yield im
    except FileNotFoundError:
        raise
    except OSError as err:
        reason = str(err).replace(f" '{path}'", "").strip() or type(err).__name__
        raise ValueError(f"{what} {path} could not be read ({reason}): replace or remove the file") from err


def read_image(path: str | Path, exif_orientation: bool = False) -> np.ndarray:
    """``H×W×3`` uint8 RGB (grey, CMYK and palette images are converted). A dataset reads its images as stored, so
    the pixels stay aligned with the label maps, which carry no EXIF; ``exif_orientation=True`` (prediction on
    photos) turns them upright as viewers show them, as mmseg's OpenCV-based loading does."""
    with _opened(path, "image") as im:
        return pil_to_rgb(im, f"image {path}", upright=exif_orientation)


def pil_to_rgb(im: Image.Image, what: str = "the image", upright: bool = False) -> np.ndarray:
    """``H×W×3`` uint8 RGB of a PIL image of any mode: 16-bit grey gives its top 8 bits, as OpenCV reads it (Pillow's
    own ``convert("RGB")`` would clip it to white); 32-bit and floating-point pixels have no such reading and are
    refused, naming ``what``. Of an animation or a multi-page file, the first frame (said, except for the
    previews a camera stores beside its JPEG); ``upright`` turns it by its EXIF orientation."""
    if getattr(im, "n_frames", 1) > 1 and im.format != "MPO":  # a camera JPEG's extra pictures are previews
        warnings.warn(f"{what} has {im.n_frames} frames: the first is read (a video file is segmented frame by "
                      f"frame)", stacklevel=3)
    if upright:
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        grey = np.array(im).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ValueError(f"{what} is a 32-bit {im.mode} image: convert it to 8-bit RGB")
        return np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode == "F":
        raise ValueError(f"{what} holds floating-point pixels: convert it to 8-bit RGB")
    return np.array(im if im.mode == "RGB" else im.convert("RGB"))


def read_label(path: str | Path) -> np.ndarray:
    """``H×W`` class indices: uint8 for 8-bit ("L"/"P") PNGs, int64 for 16/32-bit ones. Never converts to RGB."""
    with _opened(path, "label") as im:
        if im.mode in ("L", "P", "1"):
            return np.array(im, dtype=np.uint8)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            return np.array(im).astype(np.int64)
        raise ValueError(
            f"label {path} is a {im.mode} image; expected a single-channel PNG of class indices (mode L or P) -- "
            "convert colour-coded masks to indices first"
        )


_REDUCE_LUT = np.arange(256, dtype=np.int64) - 1
_REDUCE_LUT[0] = 255
_REDUCE_LUT[255] = 255
_REDUCE_LUT = _REDUCE_LUT.astype(np.uint8)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 (unlabelled) → 255 (ignore), v → v − 1, 255 stays 255."""
    if label.dtype == np.uint8:
        return _REDUCE_LUT[label]
    out = label.astype(np.int64) - 1
    out[(label == 0) | (label == 255)] = 255
    return out


# ---------------------------------------------------------------------------------------------------- base
class SegDataset(Dataset):
    """Base class: class names, palette and the ``img/gt/meta`` sample format.

    Subclasses implement ``__len__``, :meth:`load_image`, :meth:`load_label`, :meth:`sample_name` and
    :meth:`img_path`; they may override :meth:`load_pair` when image and label come from one computation.

    A ``transform`` is called as ``transform(img_uint8_HxWx3, label_HxW)`` and returns ``(img, gt)`` or
    ``(img, gt, info)`` (``info`` is merged into ``meta``), e.g. :class:`~edgeseg.data.TrainTransform`.
    """

    classes: tuple[str, ...] = ()
    palette: list[tuple[int, int, int]] = []
    ignore_index: int = 255
    reduce_zero_label: bool = False

    def __init__(self, transform: Transform | None = None) -> None:
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        raise NotImplementedError

    def load_image(self, i: int) -> np.ndarray:
        """``H×W×3`` uint8 RGB."""
        raise NotImplementedError

    def load_label(self, i: int) -> np.ndarray:
        """``H×W`` uint8/int64 train ids after ``reduce_zero_label`` (255 = ignore)."""
        raise NotImplementedError

    def sample_name(self, i: int) -> str:
        raise NotImplementedError

    def img_path(self, i: int) -> str:
        raise NotImplementedError

    def label_path(self, i: int) -> str | None:
        """The file of sample ``i``'s label map, named where a label needs fixing; None for computed labels."""
        return None

    def load_pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.load_image(i), self.load_label(i)

    def _check_index(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {n}")
        return i

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check_index(int(i))
        img, gt = self.load_pair(i)
        meta: dict[str, Any] = {
            "name": self.sample_name(i), "ori_size": tuple(img.shape[:2]), "img_path": self.img_path(i),
        }
        if self.transform is None:
            x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
            y = torch.from_numpy(gt.astype(np.int64))
        else:
            out = self.transform(img, gt)
            x, y = out[0], out[1]
            if len(out) > 2:
                meta.update(out[2])
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(np.ascontiguousarray(x))
            if isinstance(y, np.ndarray):
                y = torch.from_numpy(y.astype(np.int64))
        return {"img": x, "gt": y, "meta": meta}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_samples={len(self)}, num_classes={self.num_classes})"


class FileSegDataset(SegDataset):
    """A list of ``(image path, label path)`` pairs read with Pillow."""

    img_suffix: str = ""  # stripped from the image file name to give the sample name

    def __init__(
        self,
        samples: Sequence[tuple[str | Path, str | Path]],
        classes: Sequence[str],
        palette: Sequence[Sequence[int]] | None = None,
        reduce_zero_label: bool = False,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(transform)
        # Plain strings: cheap to pickle into DataLoader workers.
        self.img_files = [str(p) for p, _ in samples]
        self.ann_files = [str(a) for _, a in samples]
        self.classes = tuple(classes)
        palette = palette if palette is not None else default_palette(len(self.classes))
        self.palette = [tuple(int(v) for v in c) for c in palette]
        if len(self.palette) != len(self.classes):
            raise ValueError(f"{len(self.classes)} classes but {len(self.palette)} palette colours")
        self.reduce_zero_label = bool(reduce_zero_label)

    def __len__(self) -> int:
        return len(self.img_files)

    def load_image(self, i: int) -> np.ndarray:
        return read_image(self.img_files[i])

    def load_label(self, i: int) -> np.ndarray:
        label = read_label(self.ann_files[i])
        return reduce_zero_label(label) if self.reduce_zero_label else label

    def load_pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img, label = self.load_image(i), self.load_label(i)
        if img.shape[:2] != label.shape:
            raise ValueError(f"image {self.img_files[i]} is {img.shape[1]}x{img.shape[0]} but its label "
                             f"{self.ann_files[i]} is {label.shape[1]}x{label.shape[0]}: a label map has its "
                             f"image's size")
        return img, label

    def sample_name(self, i: int) -> str:
        name = os.path.basename(self.img_files[i])
        if self.img_suffix and name.endswith(self.img_suffix):
            return name[: -len(self.img_suffix)]
        return os.path.splitext(name)[0]

    def img_path(self, i: int) -> str:
        return self.img_files[i]

    def label_path(self, i: int) -> str:
        return self.ann_files[i]


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})  # read as images


def scan_pairs(
    img_dir: Path,
    img_suffix: str,
    ann_dir: Path,
    seg_map_suffix: str,
    split_file: Path | None,
    what: str,
    suffix_setting: str | None = None,
) -> list[tuple[Path, Path]]:
    """Pair ``xxx{img_suffix}`` under ``img_dir`` with ``xxx{seg_map_suffix}`` under ``ann_dir`` (same relative path).

    With ``split_file`` the stems come from it, one per line (mmseg's ``split=``); otherwise ``img_dir`` is scanned
    recursively and sorted by relative path, as mmseg does. ``what`` describes the expected layout for errors;
    ``suffix_setting`` names where a layout whose image suffix can be chosen sets it (a folder of other images then
    gets the suffix it holds in the error).
    """
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} not found; expected {what}")
    if split_file is not None:
        if not split_file.is_file():
            raise FileNotFoundError(f"split file {split_file} not found; expected {what}")
        stems = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    else:
        stems, others = [], collections.Counter()
        shared = img_dir.resolve() == ann_dir.resolve()  # images and label maps side by side
        for dirpath, files in walk_files(img_dir):
            rel = os.path.relpath(dirpath, img_dir)
            for f in files:
                if f.endswith(img_suffix):
                    stem = f[: -len(img_suffix)]
                    stems.append(stem if rel == "." else os.path.join(rel, stem))
                elif os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES and not (shared and f.endswith(seg_map_suffix)):
                    others[os.path.splitext(f)[1]] += 1
        stems.sort(key=lambda s: s + img_suffix)
        if stems and others and suffix_setting is not None:  # e.g. a few .jpeg or .JPG among .jpg: not silently left
            found = ", ".join(f"{n} *{suffix}" for suffix, n in sorted(others.items(), key=lambda o: (-o[1], o[0])))
            warnings.warn(f"{img_dir}: {found} files skipped, only *{img_suffix} images are read (mmseg's "
                          f"img_suffix, case-sensitive): rename them, or set img_suffix in {suffix_setting}",
                          stacklevel=2)
    if not stems:
        hint = ""
        if split_file is None and suffix_setting is not None:
            found = collections.Counter(Path(f).suffix for _, files in walk_files(img_dir) for f in files
                                        if Path(f).suffix)
            if found:
                suffix, count = found.most_common(1)[0]
                hint = f" (it holds {count} *{suffix} files: set img_suffix: {suffix} in {suffix_setting})"
        raise FileNotFoundError(f"no *{img_suffix} images in {img_dir}{hint}; expected {what}")
    pairs = [(img_dir / (s + img_suffix), ann_dir / (s + seg_map_suffix)) for s in stems]
    for img, ann in pairs:
        if not img.is_file():
            raise FileNotFoundError(f"image {img} not found; expected {what}")
        if not ann.is_file():
            raise FileNotFoundError(f"label {ann} not found for image {img}; expected {what}")
    return pairs


def _root(name: str, root: str | Path | None, layout: str) -> Path:
    if root is None:
        raise ValueError(f"{name}: a data root is required (a recipe's data.root, or --set data.root=PATH); expected "
                         f"{layout}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: data root {path} not found; expected {layout}")
    return path


def _split_dir(name: str, split: str, aliases: dict[str, str]) -> str:
    if split in aliases:
        return aliases[split]
    if split in aliases.values():
        return split
    raise ValueError(f"{name}: unknown split {split!r}; use one of {sorted(aliases)}")


# ---------------------------------------------------------------------------------------------- the layouts
class ADE20KDataset(FileSegDataset):
    """ADE20K (SceneParsing, 150 classes): ``ADEChallengeData2016/images/{training,validation}/*.jpg`` with
    ``annotations/{training,validation}/*.png``. Label 0 is "other objects" and is ignored (reduce_zero_label)."""

    LAYOUT = (
        "<root>/images/{training,validation}/*.jpg and <root>/annotations/{training,validation}/*.png "
        "(root = ADEChallengeData2016)"
    )
    img_suffix = ".jpg"

    def __init__(self, root: str | Path | None, split: str = "train", transform: Transform | None = None) -> None:
        path = _root("ade20k", root, self.LAYOUT)
        if not (path / "images").is_dir() and (path / "ADEChallengeData2016").is_dir():
            path = path / "ADEChallengeData2016"
        sub = _split_dir("ade20k", split, {"train": "training", "val": "validation"})
        pairs = scan_pairs(path / "images" / sub, ".jpg", path / "annotations" / sub, ".png", None, self.LAYOUT)
        super().__init__(pairs, CLASSES["ade20k"], PALETTES["ade20k"], reduce_zero_label=True, transform=transform)


class CityscapesDataset(FileSegDataset):
    """Cityscapes (19 train ids): ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` with
    ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` (made by cityscapesscripts' createTrainIdLabelImgs)."""

    LAYOUT = (
        "<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
        "<root>/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png"
    )
    img_suffix = "_leftImg8bit.png"

    def __init__(self, root: str | Path | None, split: str = "train", transform: Transform | None = None) -> None:
        path = _root("cityscapes", root, self.LAYOUT)
        sub = _split_dir("cityscapes", split, {"train": "train", "val": "val", "test": "test"})
        pairs = scan_pairs(
            path / "leftImg8bit" / sub, "_leftImg8bit.png", path / "gtFine" / sub, "_gtFine_labelTrainIds.png",
            None, self.LAYOUT,
        )
        super().__init__(pairs, CLASSES["cityscapes"], PALETTES["cityscapes"], transform=transform)


class PascalContextDataset(FileSegDataset):
    """Pascal-Context, 60 classes (mmseg's ``PascalContextDataset``, background kept as class 0): VOC2010
    ``JPEGImages/*.jpg`` with ``SegmentationClassContext/*.png`` and
    ``ImageSets/SegmentationContext/{train,val}.txt``."""

    LAYOUT = (
        "<root>/JPEGImages/*.jpg, <root>/SegmentationClassContext/*.png and "
        "<root>/ImageSets/SegmentationContext/{train,val}.txt (root = VOCdevkit/VOC2010)"
    )
    img_suffix = ".jpg"
    _key = "pascal_context"
    _reduce = False

    def __init__(self, root: str | Path | None, split: str = "train", transform: Transform | None = None) -> None:
        path = _root(self._key, root, self.LAYOUT)
        if not (path / "JPEGImages").is_dir() and (path / "VOCdevkit" / "VOC2010").is_dir():
            path = path / "VOCdevkit" / "VOC2010"
        split_file = path / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        pairs = scan_pairs(
            path / "JPEGImages", ".jpg", path / "SegmentationClassContext", ".png", split_file, self.LAYOUT
        )
        super().__init__(pairs, CLASSES[self._key], PALETTES[self._key], self._reduce, transform=transform)


class PascalContext59Dataset(PascalContextDataset):
    """Pascal-Context, 59 classes (mmseg's ``PascalContextDataset59``): the same files, label 0 (background)
    ignored via reduce_zero_label."""

    _key = "pascal_context_59"
    _reduce = True


class COCOStuff164kDataset(FileSegDataset):
    """COCO-Stuff 164k (171 classes): ``images/{train2017,val2017}/*.jpg`` with
    ``annotations/{train2017,val2017}/*_labelTrainIds.png`` (mmseg's tools/convert_datasets/coco_stuff164k.py)."""

    LAYOUT = "<root>/images/{train2017,val2017}/*.jpg and <root>/annotations/{train2017,val2017}/*_labelTrainIds.png"
    img_suffix = ".jpg"

    def __init__(self, root: str | Path | None, split: str = "train", transform: Transform | None = None) -> None:
        path = _root("coco_stuff164k", root, self.LAYOUT)
        sub = _split_dir("coco_stuff164k", split, {"train": "train2017", "val": "val2017"})
        pairs = scan_pairs(
            path / "images" / sub, ".jpg", path / "annotations" / sub, "_labelTrainIds.png", None, self.LAYOUT
        )
        super().__init__(pairs, CLASSES["coco_stuff164k"], PALETTES["coco_stuff164k"], transform=transform)


class COCOStuff10kDataset(FileSegDataset):
    """COCO-Stuff 10k (171 classes): ``images/{train2014,test2014}/*.jpg`` with
    ``annotations/{train2014,test2014}/*_labelTrainIds.png`` (mmseg's tools/convert_datasets/coco_stuff10k.py).

    The official 10k configs load these labels with ``reduce_zero_label=True`` (unlike 164k), and evaluate on the
    test2014 split, so ``"val"`` and ``"test"`` both mean test2014.
    """

    LAYOUT = "<root>/images/{train2014,test2014}/*.jpg and <root>/annotations/{train2014,test2014}/*_labelTrainIds.png"
    img_suffix = ".jpg"

    def __init__(self, root: str | Path | None, split: str = "train", transform: Transform | None = None) -> None:
        path = _root("coco_stuff10k", root, self.LAYOUT)
        sub = _split_dir("coco_stuff10k", split, {"train": "train2014", "val": "test2014", "test": "test2014"})
        pairs = scan_pairs(
            path / "images" / sub, ".jpg", path / "annotations" / sub, "_labelTrainIds.png", None, self.LAYOUT
        )
        super().__init__(pairs, CLASSES["coco_stuff"], PALETTES["coco_stuff"], reduce_zero_label=True,
                         transform=transform)


_DATASET_YAML = {"classes": list, "palette": list, "img_dir": str, "ann_dir": str, "img_suffix": str,
                 "seg_map_suffix": str, "reduce_zero_label": bool, "splits": dict, "generator": dict}


_noted_keys: set[tuple[str, Any]] = set()  # (dataset.yaml, key) pairs already said to be ignored


def read_dataset_yaml(path: Path) -> dict[str, Any]:
    """A folder dataset's description, checked key by key: a typo or a quoted ``'false'`` would otherwise change
    what is trained and scored without a word."""
    cfg = read_yaml(path, str(path)) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must be a mapping (classes:, palette:, ...), got {type(cfg).__name__}")
    for key, value in cfg.items():
        kind = _DATASET_YAML.get(key)
        if kind is None:
            close = difflib.get_close_matches(str(key), _DATASET_YAML, n=1, cutoff=0.8)
            if close:  # a typo: its key's default would silently change the labels (reduce_zero_labels)
                raise ValueError(f"{path}: unknown key {key!r}: did you mean {close[0]!r}?")
            # a note of the user's own (name:, source:): said once, not refused (both splits read the file)
            if (str(path), key) not in _noted_keys:
                _noted_keys.add((str(path), key))
                warnings.warn(f"{path}: unknown key {key!r} ignored; the keys are {', '.join(_DATASET_YAML)}",
                              stacklevel=3)
            continue
        if not isinstance(value, kind):
            expected = {list: "a list", str: "a string", bool: "true or false", dict: "a mapping"}[kind]
            raise ValueError(f"{path}: {key} must be {expected}, got {value!r}")
    if not all(isinstance(c, (str, int)) for c in cfg.get("classes", [])):
        raise ValueError(f"{path}: classes must be a list of names, e.g. [road, car, person]")
    for colour in cfg.get("palette", []):
        if not (isinstance(colour, list) and len(colour) == 3
                and all(isinstance(v, int) and 0 <= v <= 255 for v in colour)):
            raise ValueError(f"{path}: palette colours are [r, g, b] with values 0..255, got {colour!r}")
    return cfg


class FolderDataset(FileSegDataset):
    """Any dataset in mmseg's custom layout, described by a small ``dataset.yaml`` in its root::

        classes: [road, car, person]          # required (here or as the ``classes`` argument)
        palette: [[128, 64, 128], [0, 0, 142], [220, 20, 60]]   # optional
        img_dir: img_dir                      # defaults shown
        ann_dir: ann_dir
        img_suffix: .jpg
        seg_map_suffix: .png
        reduce_zero_label: false
        splits: {train: splits/train.txt}     # optional split files (stems, one per line)

    Images are ``<root>/<img_dir>/<split>/**/xxx<img_suffix>`` with labels ``<root>/<ann_dir>/<split>/**/
    xxx<seg_map_suffix>``; with a split file the ``<split>`` folder may be absent (flat ``img_dir``/``ann_dir``).
    ``split=None`` reads the flat folders whole. Keyword arguments override the YAML.
    """

    def __init__(
        self,
        root: str | Path | None,
        split: str | None = "train",
        transform: Transform | None = None,
        *,
        img_dir: str | None = None,
        ann_dir: str | None = None,
        img_suffix: str | None = None,
        seg_map_suffix: str | None = None,
        split_file: str | Path | None = None,
        classes: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        reduce_zero_label: bool | None = None,
        meta_file: str = "dataset.yaml",
    ) -> None:
        layout_hint = (
            "<root>/img_dir/<split>/*.jpg, <root>/ann_dir/<split>/*.png and <root>/dataset.yaml with `classes: [...]`"
        )
        path = _root("folder", root, layout_hint)
        cfg: dict[str, Any] = {}
        meta_path = path / meta_file
        if meta_path.is_file():
            cfg = read_dataset_yaml(meta_path)
        img_dir = img_dir if img_dir is not None else cfg.get("img_dir", "img_dir")
        ann_dir = ann_dir if ann_dir is not None else cfg.get("ann_dir", "ann_dir")
        img_suffix = img_suffix if img_suffix is not None else cfg.get("img_suffix", ".jpg")
        seg_map_suffix = seg_map_suffix if seg_map_suffix is not None else cfg.get("seg_map_suffix", ".png")
        reduce = reduce_zero_label if reduce_zero_label is not None else bool(cfg.get("reduce_zero_label", False))
        classes = classes if classes is not None else cfg.get("classes")
        palette = palette if palette is not None else cfg.get("palette")
        if not classes:
            raise ValueError(
                f"folder dataset {path}: no class names; write {meta_path} with `classes: [...]` "
                "(optional `palette: [[r, g, b], ...]`) or pass classes="
            )
        if split_file is None and split is not None:
            split_file = (cfg.get("splits") or {}).get(split)
        split_path = None if split_file is None else path / split_file  # an absolute split_file stays absolute
        img_root, ann_root = path / img_dir, path / ann_dir
        if split:
            if (img_root / split).is_dir():
                img_root, ann_root = img_root / split, ann_root / split
            elif split_path is None:
                raise FileNotFoundError(
                    f"folder dataset: {img_root / split} not found; expected <root>/{img_dir}/{split}/*{img_suffix} "
                    f"and <root>/{ann_dir}/{split}/*{seg_map_suffix}, or a split file (split_file= or `splits:` in "
                    f"{meta_file})"
                )
        sub = f"/{split}" if split and img_root.name == split else ""
        what = f"<root>/{img_dir}{sub}/*{img_suffix} and <root>/{ann_dir}{sub}/*{seg_map_suffix} (root = {path})"
        pairs = scan_pairs(img_root, img_suffix, ann_root, seg_map_suffix, split_path, what, meta_path.name)
        self.img_suffix = img_suffix
        if palette is not None and len(palette) != len(classes):
            raise ValueError(f"{meta_path}: {len(classes)} classes but {len(palette)} palette colours")
        twice = sorted(name for name, n in collections.Counter(map(str, classes)).items() if n > 1)
        if twice:  # per-class results are keyed by name: one would hide the other
            raise ValueError(f"{meta_path}: class names {twice} appear more than once; give each class its own name")
        super().__init__(pairs, classes, palette, reduce, transform=transform)


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples: ``img`` ``(B, 3, H, W)`` and ``gt`` ``(B, H, W)`` stacked, ``meta`` a list of dicts.

    If the samples differ in size (e.g. test-time images at their own resolution, batch > 1) ``img``/``gt`` stay
    lists of tensors rather than failing; a ``gt`` of None (test transform without labels) stays None.
    """

    def stack(items: list[Any]) -> Any:
        if any(t is None for t in items):
            return None if all(t is None for t in items) else items
        if all(t.shape == items[0].shape for t in items):
            return torch.stack(items)
        return items

    return {
        "img": stack([b["img"] for b in batch]),
        "gt": stack([b["gt"] for b in batch]),
        "meta": [b["meta"] for b in batch],
    }
