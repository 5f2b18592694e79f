"""Joint image/mask transforms: the mmseg 0.x train and test pipelines of the TopFormer and SegFormer papers.

Train (``configs/_base_/datasets/ade20k.py`` and friends)::

    Resize(img_scale, ratio_range, keep_ratio) -> RandomCrop(crop_size, cat_max_ratio) -> RandomFlip(0.5)
    -> PhotoMetricDistortion -> Normalize -> Pad(crop_size, img 0, mask 255)

Test::

    Resize(img_scale, keep_ratio) [-> ResizeToMultiple(32) (TopFormer) / AlignedResize(32) (SegFormer)] -> Normalize

The label is *not* resized at test time: mIoU is computed at the original resolution.

Images are ``H×W×3`` uint8 RGB numpy arrays until ``Normalize``; labels ``H×W`` integer arrays with 255 = ignore.
Only numpy and torch are used (no OpenCV). Resizing follows OpenCV's ``INTER_LINEAR`` (what mmcv's ``imresize``
calls) rather than Pillow's bilinear filter, which low-pass filters when shrinking and so shifts mIoU: see
:func:`resize_bilinear`. Label resizing follows ``INTER_NEAREST`` exactly, and the photometric steps' HSV
round trips are OpenCV's uint8 conversions value for value (:func:`rgb_to_hsv`; :func:`hsv_to_rgb` as OpenCV's
vector loop computes it — the last few pixels of a row whose width is not a multiple of its vector step, which
OpenCV converts one by one and rounds, may come out one level higher there).

Randomness comes from a :class:`numpy.random.Generator`. Pass one explicitly, or let :func:`worker_rng` derive one
per call from torch's default generator: a ``DataLoader`` worker's torch generator is seeded with
``base_seed + worker_id`` and ``base_seed`` is drawn from the main process's torch generator, so
``torch.manual_seed(seed + rank)`` makes every worker of every DDP rank reproducible and distinct.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def worker_rng() -> np.random.Generator:
    """A fresh generator seeded by a draw from torch's default generator of this process.

    In a DataLoader worker that generator is seeded with ``base_seed + worker_id``; in the main process it follows
    ``torch.manual_seed``. Either way the stream of samples is reproducible from the run's seed.
    """
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


# --------------------------------------------------------------------------------------------------- geometry
def rescale_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """New ``(h, w)`` for mmcv's ``imrescale(img, scale)`` (``Resize(keep_ratio=True)``).

    The long image side may reach ``max(scale)`` and the short side ``min(scale)``; the factor is
    ``min(max(scale) / max(h, w), min(scale) / min(h, w))`` and each side is rounded as ``int(x * f + 0.5)``, kept at
    one pixel at least (a 4000×1 strip would round to no pixels, where mmcv fails).
    """
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _linear_taps(in_size: int, out_size: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of output pixels ``start..stop-1`` for OpenCV ``INTER_LINEAR``.

    Half-pixel centres (``src = (dst + 0.5) * in / out - 0.5``), clamped to the border like OpenCV (and like
    ``F.interpolate(mode="bilinear", align_corners=False)``).
    """
    src = (np.arange(start, stop, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.floor(src).astype(np.int64)
    frac = (src - i0).astype(np.float32)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, frac


def _nearest_taps(in_size: int, out_size: int, start: int, stop: int) -> np.ndarray:
    """OpenCV ``INTER_NEAREST``: ``src = floor(dst · (1 / (out / in)))``, the scale inverted as OpenCV does it (no
    half-pixel offset, as mmcv's labels get); ``in / out`` would pick the neighbouring pixel at a few taps."""
    src = np.floor(np.arange(start, stop, dtype=np.float64) * (1.0 / (out_size / in_size))).astype(np.int64)
    return np.minimum(src, in_size - 1)


Window = tuple[int, int, int, int]  # (y1, y2, x1, x2) in the resized image, end-exclusive


def resize_bilinear(img: np.ndarray, size: tuple[int, int], window: Window | None = None) -> np.ndarray:
    """Resize an ``H×W×C`` uint8 image to ``size = (h, w)`` as OpenCV ``INTER_LINEAR`` does, optionally computing
    only ``window`` of the result.

    Computing just the crop window gives the same pixels as resizing the whole image and cropping afterwards
    (mmseg's Resize → RandomCrop), at the cost of the crop rather than of an image up to 2× larger.
    OpenCV rounds its weights to 11-bit fixed point, so values may differ from mmcv by at most 1 grey level.
    Pillow's ``BILINEAR`` is not used: it widens its filter when shrinking (antialiasing), which OpenCV does not,
    and test-time downscaling would then see slightly blurrier images than the official evaluation.
    """
    out_h, out_w = size
    y1, y2, x1, x2 = window if window is not None else (0, out_h, 0, out_w)
    in_h, in_w = img.shape[:2]
    if (in_h, in_w) == (out_h, out_w):
        return img[y1:y2, x1:x2].copy()
    r0, r1, fy = _linear_taps(in_h, out_h, y1, y2)
    c0, c1, fx = _linear_taps(in_w, out_w, x1, x2)
    lo, hi = int(c0.min()), int(c1.max()) + 1  # only the source columns the window reads
    src = img[:, lo:hi]
    top = np.take(src, r0, axis=0).astype(np.float32)
    rows = np.take(src, r1, axis=0).astype(np.float32)
    rows -= top
    rows *= fy[:, None, None] if img.ndim == 3 else fy[:, None]
    rows += top
    left = np.take(rows, c0 - lo, axis=1)
    out = np.take(rows, c1 - lo, axis=1)
    out -= left
    out *= fx[None, :, None] if img.ndim == 3 else fx[None, :]
    out += left
    return np.rint(out, out=out).astype(np.uint8)  # a convex combination of uint8 values: no clipping needed


def resize_nearest(label: np.ndarray, size: tuple[int, int], window: Window | None = None) -> np.ndarray:
    """Resize an ``H×W`` label map to ``size = (h, w)`` with OpenCV ``INTER_NEAREST``, optionally only ``window``."""
    out_h, out_w = size
    y1, y2, x1, x2 = window if window is not None else (0, out_h, 0, out_w)
    in_h, in_w = label.shape[:2]
    rows = _nearest_taps(in_h, out_h, y1, y2)
    cols = _nearest_taps(in_w, out_w, x1, x2)
    return np.take(np.take(label, rows, axis=0), cols, axis=1)


def normalize_to_chw(
    img: np.ndarray, mean: Sequence[float], std: Sequence[float], pad_to: tuple[int, int] | None = None
) -> torch.Tensor:
    """``(img - mean) / std`` per RGB channel as a float32 ``3×H×W`` tensor, zero-padded at the bottom/right to
    ``pad_to`` (mmseg pads *after* Normalize, so the pad is 0 in normalised space)."""
    h, w = img.shape[:2]
    ph, pw = (max(pad_to[0], h), max(pad_to[1], w)) if pad_to is not None else (h, w)
    out = np.zeros((3, ph, pw), dtype=np.float32) if (ph, pw) != (h, w) else np.empty((3, h, w), dtype=np.float32)
    for c in range(3):
        dst = out[c, :h, :w]
        np.subtract(img[..., c], np.float32(mean[c]), out=dst, dtype=np.float32)
        dst *= np.float32(1.0 / std[c])
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------- photometric
# OpenCV's 8-bit RGB -> HSV in 12-bit fixed point: S = diff · ⌊255·2¹²/V⌉, H = hue numerator · ⌊180·2¹²/(6·diff)⌉,
# each rounded back (+2¹¹, >> 12). Index 0 is 0 (black: S = 0; grey: H = 0).
_HSV_SHIFT = 12
_SDIV = np.concatenate([[0], np.rint((255 << _HSV_SHIFT) / np.arange(1.0, 256.0))]).astype(np.int32)
_HDIV = np.concatenate([[0], np.rint((180 << _HSV_SHIFT) / (6.0 * np.arange(1.0, 256.0)))]).astype(np.int32)


def rgb_to_hsv(img: np.ndarray) -> np.ndarray:
    """uint8 RGB → uint8 HSV with OpenCV's 8-bit ranges (H in 0..179 = degrees / 2, S and V in 0..255): OpenCV's
    ``COLOR_RGB2HSV`` (what mmcv's ``bgr2hsv`` calls), integer for integer, including its fixed-point rounding."""
    r, g, b = (img[..., c].astype(np.int32) for c in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    # Hue numerator in sextants of diff, with OpenCV's precedence: V == R first, then V == G, else V == B.
    num = r - g + 4 * diff
    np.copyto(num, b - r + 2 * diff, where=v == g)
    np.copyto(num, g - b, where=v == r)
    h = (num * _HDIV[diff] + half) >> _HSV_SHIFT
    h += 180 * (h < 0)
    out = np.empty(img.shape, dtype=np.uint8)
    out[..., 0], out[..., 1], out[..., 2] = h, s, v
    return out


def _hsv_factors() -> np.ndarray:
    """``F[c, H, S]`` (float32) with OpenCV's uint8 HSV → RGB channel ``c`` = trunc(V/255 · F · 255), every step in
    float32 as OpenCV's vectorised path computes it: F is 1, ``1 − s``, ``1 − s·h`` or ``1 − s·(1 − h)`` by sector,
    with s = S/255, h the hue's fraction of its sextant, the last two as fused multiply-adds (AVX2/FMA builds)."""
    f32 = np.float32
    hue = np.arange(256, dtype=f32)[:, None] * (f32(6.0) / f32(180.0))
    sector_start = np.trunc(hue)
    frac = np.broadcast_to(hue - sector_start, (256, 256))
    s = np.broadcast_to(np.arange(256, dtype=f32)[None, :] * (f32(1.0) / f32(255.0)), (256, 256))

    def one_minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # 1 − a·b rounded once, as an FMA does
        return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(f32)

    tabs = [np.ones((256, 256), f32), f32(1.0) - s, one_minus(s, frac), one_minus(s, f32(1.0) - frac)]
    sector = (sector_start - np.trunc(sector_start * (f32(1.0) / f32(6.0))) * f32(6.0)).astype(np.int64)
    sector = np.broadcast_to(sector, (256, 256))
    # which tab each of R, G, B takes in sectors 0..5 (OpenCV's sector_data, read per channel)
    choice = {0: (0, 2, 1, 1, 3, 0), 1: (3, 0, 0, 2, 1, 1), 2: (1, 1, 3, 0, 0, 2)}
    return np.stack([np.choose(sector, [tabs[t] for t in choice[c]]) for c in range(3)])


_HSV_FACTORS = _hsv_factors()


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv`: OpenCV's uint8 ``COLOR_HSV2RGB`` (mmcv's ``hsv2bgr``) as its vectorised path
    computes it on AVX2/FMA CPUs — float32, *truncated* to uint8 (OpenCV rounds only the few pixels at the end of
    a row that its vector loop leaves over). One table gather per channel (:func:`_hsv_factors`)."""
    flat = hsv[..., 0].astype(np.intp) * 256 + hsv[..., 1]
    v = hsv[..., 2].astype(np.float32)
    v *= np.float32(1.0) / np.float32(255.0)
    out = np.empty(hsv.shape, dtype=np.uint8)
    for c in range(3):
        ch = np.take(_HSV_FACTORS[c].reshape(-1), flat)  # np.take: several times faster than fancy indexing
        ch *= v
        ch *= np.float32(255.0)
        out[..., c] = ch  # float → uint8 truncates, as OpenCV's v_trunc
    return out


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``x * alpha + beta``, clipped and *truncated* back to uint8 (kept: it is not rounding).

    Applied through a 256-entry table: the same values as the float computation, one gather instead of four passes.
    """
    lut = np.clip(np.arange(256, dtype=np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)
    return np.take(lut, x)


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion on a uint8 RGB image; each step happens with probability 0.5.

    Order: brightness (±``brightness_delta``); a coin ``mode``; contrast here if ``mode == 1``; saturation
    (in HSV); hue (±``hue_delta`` in OpenCV's 0..179 hue units); contrast here if ``mode == 0``. mmseg's comment says
    the opposite mapping of ``mode``; the code (followed here) does contrast first when ``mode == 1``. Saturation and
    hue each make their own RGB→HSV→RGB round trip, as mmseg does.
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            img = _convert(img, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        mode = rng.integers(2)
        if mode == 1:
            img = self._contrast(img, rng)
        if rng.integers(2):
            hsv = rgb_to_hsv(img)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            img = hsv_to_rgb(hsv)
        if rng.integers(2):
            hsv = rgb_to_hsv(img)
            # numpy's randint(-d, d) excludes +d; kept.
            shift = int(rng.integers(-self.hue_delta, self.hue_delta)) if self.hue_delta > 0 else 0
            hsv[..., 0] = np.take((np.arange(256) + shift) % 180, hsv[..., 0])
            img = hsv_to_rgb(hsv)
        if mode == 0:
            img = self._contrast(img, rng)
        return img

    def _contrast(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            return _convert(img, alpha=rng.uniform(*self.contrast_range))
        return img


# ------------------------------------------------------------------------------------------------ pipelines
class TrainTransform:
    """The papers' training pipeline (mmseg 0.x), applied to one ``(image, label)`` pair.

    Args:
        crop_size: ``(h, w)`` of the training crop (ADE20K 512×512, Cityscapes 512×1024, Pascal-Context 480×480).
        scale: mmseg ``img_scale`` ``(long, short)`` bound, e.g. ``(2048, 512)``; the random ratio multiplies it.
        ratio_range: range of that ratio.
        cat_max_ratio: a crop is redrawn (up to 10 times) while one class covers ``>= cat_max_ratio`` of its
            non-ignored pixels or it holds fewer than two classes; after 10 failures the next draw is kept unchecked.
        flip_prob: probability of a horizontal flip.
        photometric: apply :class:`PhotoMetricDistortion`.
        mean, std: RGB normalisation.
        ignore_index: label value ignored by the crop statistics and used to pad the label.

    Returns from ``__call__``: ``(img 3×ch×cw float32 tensor, gt ch×cw int64 tensor, info dict)``.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] | None = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = 255,
    ) -> None:
        if len(crop_size) != 2 or min(crop_size) <= 0:
            raise ValueError(f"crop_size must be (h, w) with positive sides, got {crop_size!r}")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range) if ratio_range is not None else None
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = PhotoMetricDistortion() if photometric else None
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, scale={self.scale}, ratio_range={self.ratio_range}, "
            f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, "
            f"photometric={self.photometric is not None})"
        )

    def _random_window(self, size: tuple[int, int], rng: np.random.Generator) -> Window:
        h, w = size
        ch, cw = self.crop_size
        y1 = int(rng.integers(0, max(h - ch, 0) + 1))
        x1 = int(rng.integers(0, max(w - cw, 0) + 1))
        return y1, min(y1 + ch, h), x1, min(x1 + cw, w)

    def _crop_ok(self, crop: np.ndarray) -> bool:
        counts = np.bincount(crop.ravel().astype(np.int64, copy=False))
        if self.ignore_index < len(counts):
            counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(
        self, img: np.ndarray, gt: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        rng = rng if rng is not None else worker_rng()
        h, w = img.shape[:2]
        if gt.shape[:2] != (h, w):
            raise ValueError(f"image {h}x{w} and label {gt.shape[0]}x{gt.shape[1]} differ in size")
        # Resize: random ratio × img_scale, then keep-ratio rescale (mmseg "mode 2").
        if self.ratio_range is not None:
            lo, hi = self.ratio_range
            ratio = rng.random() * (hi - lo) + lo
            scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        else:
            scale = self.scale
        size = rescale_size(h, w, scale)
        # RandomCrop on the resized pair, evaluated lazily on the crop window only.
        window = self._random_window(size, rng)
        gt_crop = resize_nearest(gt, size, window)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                if self._crop_ok(gt_crop):
                    break
                window = self._random_window(size, rng)
                gt_crop = resize_nearest(gt, size, window)
        img_crop = resize_bilinear(img, size, window)
        flip = bool(rng.random() < self.flip_prob)
        if flip:
            img_crop, gt_crop = img_crop[:, ::-1], gt_crop[:, ::-1]
        if self.photometric is not None:
            img_crop = self.photometric(np.ascontiguousarray(img_crop), rng)
        # Normalize, then Pad to the crop size (image 0 in normalised space, label ignore_index).
        x = normalize_to_chw(img_crop, self.mean, self.std, pad_to=self.crop_size)
        lab = np.full(x.shape[1:], self.ignore_index, dtype=np.int64)
        lab[: gt_crop.shape[0], : gt_crop.shape[1]] = gt_crop
        info = {"img_shape": size, "crop": window, "flip": flip}
        return x, torch.from_numpy(lab), info


class TestTransform:
    """The papers' single-scale test pipeline: keep-ratio resize, optional rounding up to a multiple, Normalize.

    Args:
        scale: ``(long, short)`` bound of mmseg's ``Resize(img_scale=scale, keep_ratio=True)``; the factor is
            ``min(long / max(h, w), short / min(h, w))`` (see :func:`rescale_size`).
        size_divisor: if set, the resized image is resized *again* (stretched, not padded) to the next multiple of
            ``size_divisor`` on each side, as TopFormer's ``ResizeToMultiple(32)`` and SegFormer's
            ``AlignedResize(size_divisor=32)`` do. Two interpolations, as in the official pipelines.
        mean, std: RGB normalisation.

    The label is returned unchanged at its original size: evaluation upsamples the logits to it.
    Returns from ``__call__``: ``(img 3×h'×w' float32 tensor, gt H×W int64 tensor or None, info dict)``.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        scale: tuple[int, int] = (2048, 512),
        size_divisor: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.scale = tuple(scale)
        self.size_divisor = size_divisor
        self.mean, self.std = tuple(mean), tuple(std)

    def __repr__(self) -> str:
        return f"TestTransform(scale={self.scale}, size_divisor={self.size_divisor})"

    def resize(self, img: np.ndarray) -> np.ndarray:
        """The resize part alone, uint8 in, uint8 out."""
        h, w = img.shape[:2]
        size = rescale_size(h, w, self.scale)
        img = resize_bilinear(img, size)
        if self.size_divisor:
            d = self.size_divisor
            aligned = (-(-size[0] // d) * d, -(-size[1] // d) * d)
            if aligned != size:
                img = resize_bilinear(img, aligned)
        return img

    def __call__(
        self, img: np.ndarray, gt: np.ndarray | None = None, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        h, w = img.shape[:2]
        resized = self.resize(img)
        nh, nw = resized.shape[:2]
        x = normalize_to_chw(resized, self.mean, self.std)
        info = {"img_shape": (nh, nw), "scale_factor": (nw / w, nh / h)}
        label = torch.from_numpy(gt.astype(np.int64)) if gt is not None else None
        return x, label, info
