"""Images in, label maps out: the inference wrapper a user calls without knowing the test pipeline.

``Segmenter`` applies the papers' test pipeline (keep-ratio resize, normalisation), runs the model, brings the
logits back to the original image size the way mmseg does, and returns class indices. ``colorize``/``overlay`` make
results visible. ``segment_video`` runs it over every frame of a video (the ``[video]`` extra: imageio + ffmpeg).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..checkpoint import check_window
from ..data import (CLASSES, IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, PALETTES, TestTransform, pil_to_rgb,
                    read_image, save_label_png)
from ..data.classes import default_palette
from ..engine.inference import predict_logits, predict_probs, whole_labels
from ..fileio import walk_files

ImageLike = str | os.PathLike | np.ndarray | Image.Image | torch.Tensor


def _as_rgb_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image '{path}' does not exist")
        return read_image(path, exif_orientation=True)
    if isinstance(image, Image.Image):  # upright, as its file path would be read
        return pil_to_rgb(image, f"the {image.mode} image given", upright=True)
    if isinstance(image, torch.Tensor):  # torchvision.io.read_image's layout: 3×H×W uint8
        if image.dim() != 3 or image.shape[0] not in (1, 3, 4) or image.dtype != torch.uint8:
            raise ValueError(f"expected a C×H×W uint8 image tensor (torchvision.io's layout), got {image.dtype} "
                             f"{tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels (0–255), got {arr.dtype}: convert, e.g. "
                         f"(x * 255).round().astype(np.uint8) for values in 0–1")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an H×W×3 RGB array (or H×W gray, H×W×4 RGBA), got {arr.shape}")
    # gray as three equal channels and RGBA without its alpha, as PIL's convert("RGB") reads such files
    return np.ascontiguousarray(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[:, :, :3])


def _normalised(names: Sequence[str]) -> list[str]:
    """Class names compared loosely: label files differ in case and stray spaces (mmseg's ADE20K has "bed ")."""
    return [str(n).strip().lower() for n in names]


def _dataset_for(num_classes: int) -> str | None:
    matches = [name for name, names in CLASSES.items() if len(names) == num_classes]
    return matches[0] if matches else None


class Segmenter:
    """A model plus its test pipeline.

    Args:
        model: any edgeseg segmentation model (eval mode is set here).
        scale: ``(long, short)`` keep-ratio bound of the test resize; default: the model's recipe's
            (``model.test_scale``, which edgeseg checkpoints carry), else ADE20K's ``(2048, 512)``.
        size_divisor: round the resized image up to a multiple of this (SegFormer's ADE20K pipeline: 32); default:
            the recipe's (``model.test_size_divisor``) when ``scale`` is left to the recipe too, else none.
        class_names, palette: for reports and colour maps; default to the model's own (``model.class_names``,
            ``model.palette``: from its checkpoint or training set), else to the dataset with its class count.
        fuse: run the model's inference form (``model.fuse()``: BN and SegFormer's decoder folded, DGL gates
            folded; a copy, ``model`` itself is left as it is) — the same logits up to float32 rounding (a few 1e-6
            to a few 1e-5 of logits ~3–20), about twice as fast.
        mode: ``"whole"`` (one forward per image) or ``"slide"`` (mmseg's sliding window, as SegFormer's Cityscapes
            recipe evaluates); default: the recipe's — ``"slide"`` where the model carries a window
            (``model.test_crop_size``, ``model.test_stride``: edgeseg checkpoints of slide recipes), else whole.
        crop_size, stride: ``(H, W)`` of the sliding window; default: the model's.
    """

    def __init__(self, model: nn.Module, scale: Sequence[int] | None = None, size_divisor: int | None = None,
                 class_names: Sequence[str] | None = None,
                 palette: Sequence[Sequence[int]] | None = None, fuse: bool = True, mode: str | None = None,
                 crop_size: Sequence[int] | None = None, stride: Sequence[int] | None = None) -> None:
        self.model = model.fuse().eval() if fuse and callable(getattr(model, "fuse", None)) else model.eval()
        # the test resize and normalisation the model was trained with (its checkpoint carries them), else ADE20K's
        if scale is None:
            scale = getattr(model, "test_scale", None) or (2048, 512)
            size_divisor = size_divisor or getattr(model, "test_size_divisor", None)
        self.transform = TestTransform(tuple(scale), size_divisor, mean=getattr(model, "input_mean", IMAGENET_MEAN),
                                       std=getattr(model, "input_std", IMAGENET_STD))
        if (crop_size is None) != (stride is None):
            raise ValueError("a sliding window needs crop_size and stride together")
        if crop_size is None:
            crop_size, stride = getattr(model, "test_crop_size", None), getattr(model, "test_stride", None)
        self.mode = mode or ("slide" if crop_size and stride else "whole")
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"inference mode must be 'whole' or 'slide', got '{self.mode}'")
        if self.mode == "slide" and not (crop_size and stride):
            raise ValueError("slide inference needs a window: give crop_size and stride (the model's recipe has none)")
        self.window = check_window(crop_size, stride) if self.mode == "slide" else None
        num_classes = model.num_classes
        names = class_names or getattr(model, "class_names", None)
        dataset = _dataset_for(num_classes)
        if dataset is not None and names is not None and _normalised(names) != _normalised(CLASSES[dataset]):
            dataset = None  # the model's own classes: another dataset's colours would mislead
        names = names or (CLASSES[dataset] if dataset else None)
        self.class_names = list(names) if names else [f"class_{i}" for i in range(num_classes)]
        palette = palette or getattr(model, "palette", None) or (PALETTES[dataset] if dataset else None)
        self.palette = [tuple(c) for c in (palette or default_palette(num_classes))]

    @property
    def device(self) -> torch.device:
        """Where the model runs (move it with ``segmenter.model.to(...)``); images go there, results come back."""
        return next(self.model.parameters()).device

    def _network_input(self, image: ImageLike) -> tuple[torch.Tensor, tuple[int, int]]:
        rgb = _as_rgb_array(image)
        img, _, _ = self.transform(rgb)
        return img[None].to(self.device), rgb.shape[:2]

    @torch.inference_mode()
    def probabilities(self, image: ImageLike) -> torch.Tensor:
        """Class probabilities (K, H, W) at the original image size, on the CPU."""
        img, size = self._network_input(image)
        return self._probs(img, size)[0].cpu()

    def _probs(self, img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return predict_probs(self.model, img, size, self.mode, *(self.window or (None, None)))

    def _logits(self, image: ImageLike) -> torch.Tensor:
        img, size = self._network_input(image)
        return predict_logits(self.model, img, size, self.mode, *(self.window or (None, None)))[0]

    @torch.inference_mode()
    def logits(self, image: ImageLike) -> torch.Tensor:
        """Class logits (K, H, W) at the original image size, on the CPU: upsampled as mmseg does, or averaged over
        the sliding windows (:func:`~edgeseg.engine.inference.predict_logits`)."""
        return self._logits(image).cpu()

    @torch.inference_mode()
    def __call__(self, image: ImageLike) -> np.ndarray:
        """Class indices (H, W) as uint8 (int32 beyond 255 classes): the argmax of the logits (the softmax would not
        change it, and costs more than the upsampling at 150 classes), taken where the model runs — on the CPU
        without the upsampled logits (:func:`~edgeseg.engine.inference.whole_labels`); with a sliding window, the
        argmax of the probabilities, as ``eval`` takes it.

        ``image``: a file path, a PIL image (upright by its EXIF orientation), an H×W×3 RGB uint8 array (H×W gray
        and H×W×4 RGBA too, read as PIL converts them) or a 3×H×W uint8 tensor (``torchvision.io.read_image``)."""
        img, size = self._network_input(image)
        if self.window:
            labels = self._probs(img, size).argmax(1)[0].cpu().numpy()
        else:
            labels = whole_labels(self.model, img, size)[0].cpu().numpy()
        return labels.astype(np.uint8 if self.model.num_classes <= 255 else np.int32)

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """H×W×3 uint8 colour image of a label map (ignored pixels white)."""
        lut = np.full((max(256, len(self.palette)), 3), 255, dtype=np.uint8)
        lut[: len(self.palette)] = np.asarray(self.palette, dtype=np.uint8)
        return lut[labels]

    def overlay(self, image: ImageLike, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """The image with the colour map blended on top."""
        rgb = _as_rgb_array(image).astype(np.float32)
        return (rgb * (1 - alpha) + self.colorize(labels).astype(np.float32) * alpha).round().astype(np.uint8)


VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv"})


def expand_inputs(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  recursive: bool = False) -> list[tuple[Path, Path]]:
    """``edgeseg predict``'s inputs, each with the folder its predictions go to. Files are taken as given, a folder as
    the images and videos directly inside it (sorted by name), all predicted into ``out_dir``. With ``recursive``,
    a folder's subfolders too, each predicted into its own path under ``out_dir``: a dataset laid out by subfolder
    (Cityscapes' ``leftImg8bit/val/<city>/``) keeps its layout, and images named alike in two subfolders stay apart.

    A recursive search follows folders that are symbolic links (each real folder once), as the dataset scans do, and
    skips ``out_dir`` (earlier predictions are not inputs). A folder with nothing to predict is an error; a missing
    file is left for the reader to report.
    """
    readable, out_dir = IMAGE_SUFFIXES | VIDEO_SUFFIXES, Path(out_dir)
    inputs = []
    for path in map(Path, paths):
        if not path.is_dir():
            inputs.append((path, out_dir))
            continue
        found = _files_below(path, skip=out_dir) if recursive else list(path.iterdir())
        inside = sorted(p for p in found if p.is_file() and p.suffix.lower() in readable)
        if not inside:
            deeper = not recursive and any(p.suffix.lower() in readable for p in _files_below(path, skip=out_dir))
            fix = "its subfolders hold some: pass --recursive" if deeper else \
                "pass the files, or the folder that holds them"
            raise ValueError(f"folder '{path}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) or videos "
                             f"({', '.join(sorted(VIDEO_SUFFIXES))}): {fix}")
        inputs.extend((p, out_dir / p.parent.relative_to(path)) for p in inside)
    return inputs


def _files_below(folder: Path, skip: Path) -> list[Path]:
    return [Path(dirpath) / f for dirpath, files in walk_files(folder, skip) for f in files]


def is_video(path: str | os.PathLike) -> bool:
    """Whether ``edgeseg predict`` treats ``path`` as a video (by its suffix; GIFs are read as images)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def prediction_paths(path: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Where ``edgeseg predict`` writes the prediction of ``path``: (label map, overlay) — for an image
    ``<stem>.png`` and ``<stem>_overlay.jpg``, for a video the folder ``<stem>/`` of per-frame label maps and
    ``<stem>_overlay.mp4``."""
    stem, out_dir = Path(path).stem, Path(out_dir)
    if is_video(path):
        return out_dir / stem, out_dir / f"{stem}_overlay.mp4"
    return out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.jpg"


def check_outputs(inputs: Sequence[tuple[Path, Path]]) -> None:
    """Refuse, before anything runs, (input, output folder) pairs whose predictions would overwrite an input or each
    other (outputs are named by stem: ``a/1.jpg`` and ``b/1.jpg``, or ``--out`` set to the images' own folder)."""
    given = {p.resolve() for p, _ in inputs}
    writer: dict[Path, Path] = {}
    for path, out_dir in inputs:
        for written in prediction_paths(path, out_dir):
            if written.resolve() in given:
                raise ValueError(f"{written} is an input and would be overwritten by a prediction: choose another "
                                 f"--out folder")
            other = writer.setdefault(written, path)
            if other != path:
                raise ValueError(f"{other} and {path} would both write {written}: predict them into separate "
                                 f"--out folders")


def _video_io():
    try:
        import imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio's FFMPEG plugin runs)
    except ImportError as err:
        raise ImportError(f"reading and writing video needs the video extra ({err.name} is missing): "
                          "pip install 'edgeseg[video]'") from None
    return imageio


def segment_video(segmenter: Segmenter, video: str | os.PathLike, out_dir: str | os.PathLike,
                  alpha: float = 0.5) -> tuple[Path, Path, int]:
    """Segment every frame of ``video``: palette label PNGs ``out_dir/<stem>/000000.png …`` and an overlay video
    ``out_dir/<stem>_overlay.mp4`` (H.264, the source's frame rate). Returns (overlay video, label folder, frames).

    Frames stream through one at a time, so a long video never sits in memory. The overlay video appears only when
    complete (written under a temporary name, then renamed). H.264 in yuv420p needs even sides: a frame with an odd
    side gets its last row or column repeated — never resampled.
    """
    imageio = _video_io()
    video = Path(video)
    if not video.is_file():
        raise FileNotFoundError(f"video '{video}' does not exist")
    try:
        reader = imageio.get_reader(video, "ffmpeg")
    except Exception as err:  # ffmpeg's own message: unknown container, missing codec, not a video...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"video '{video}' could not be opened by ffmpeg: {reason}") from None
    out_dir = Path(out_dir)
    labels_dir, target = prediction_paths(video, out_dir)
    labels_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{video.stem}_overlay.partial.mp4"
    frames = 0
    try:
        with reader, imageio.get_writer(partial, "ffmpeg", fps=reader.get_meta_data().get("fps") or 25,
                                        codec="libx264", quality=8, macro_block_size=1) as writer:
            for frame in reader:
                rgb = np.ascontiguousarray(frame[..., :3])
                labels = segmenter(rgb)
                save_label_png(labels, labels_dir / f"{frames:06d}.png", segmenter.palette)
                shown = segmenter.overlay(rgb, labels, alpha)
                writer.append_data(np.pad(shown, ((0, shown.shape[0] % 2), (0, shown.shape[1] % 2), (0, 0)),
                                          mode="edge"))
                frames += 1
        if frames == 0:
            raise ValueError(f"video '{video}' has no frames")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target, labels_dir, frames
