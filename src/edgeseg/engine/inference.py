"""Test-time inference as mmseg 0.x does it: whole image, sliding window, multi-scale + flip.

The published mIoUs were measured with ``EncoderDecoder.inference``/``aug_test``; the details below each move the
number, so they are kept exactly:

- ``encode_decode`` upsamples the native logits to the *network input* size, and ``whole_inference`` then resizes
  that again to the *original* image size (two bilinear resizes, ``align_corners=False``), not once;
- the sliding window visits ``max(H − crop + stride − 1, 0) // stride + 1`` rows (same for columns), shifting the
  last window back inside the image, sums the crop logits and divides by how many windows covered each pixel;
- the per-view output is ``softmax(logits)``; flipped views are flipped back; test-time augmentation averages these
  probabilities over all views (``aug_test``), and the label is the argmax. For one view that is the argmax of its
  logits, which :func:`whole_labels` takes without the full-resolution maps (``Segmenter`` and single-view
  evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..models import native


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def encode_decode(model: nn.Module, img: Tensor) -> Tensor:
    """Logits (B, K, H, W) at the input size of ``img`` (B, 3, H, W): the model's native output, upsampled."""
    return _resize(model(img).float(), img.shape[-2:])


def _upsampled(logits: Tensor, size: Sequence[int], out_size: Sequence[int] | None) -> Tensor:
    """A forward's native logits resized to the network input ``size``, then to ``out_size`` (mmseg's two resizes)."""
    logits = _resize(logits, size)
    return logits if out_size is None else _resize(logits, out_size)


def whole_inference(model: nn.Module, img: Tensor, out_size: Sequence[int] | None = None) -> Tensor:
    """Logits (B, K, *out_size) from one forward pass over the whole image (mmseg ``whole_inference``)."""
    return _upsampled(model(img).float(), img.shape[-2:], out_size)


def whole_labels(model: nn.Module, img: Tensor, out_size: Sequence[int] | None = None) -> Tensor:
    """Labels (B, *out_size), int64: the argmax over classes of :func:`whole_inference`'s logits.

    Where the native kernel runs (CPU float32 inference, channels-last logits: SegFormer eager and fused, TopFormer
    fused), the two resizes and the argmax are one pass that never writes the resized logits
    (:func:`.native.resize_argmax`, same labels except between classes within ~1e-7 of each other): for 150
    classes at 512 × 683 about a tenth of the time of resizing and then taking the argmax (which together take as
    long as the fused SegFormer-B0 forward).
    """
    logits = model(img).float()
    labels = native.resize_argmax(logits, img.shape[-2:], out_size)
    return _upsampled(logits, img.shape[-2:], out_size).argmax(1) if labels is None else labels


def slide_windows(height: int, width: int, crop: Sequence[int],
                  stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """The (y1, y2, x1, x2) windows of mmseg's ``slide_inference`` grid, row by row."""
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, height)
            x2 = min(w_idx * w_stride + w_crop, width)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


def slide_inference(model: nn.Module, img: Tensor, crop: Sequence[int], stride: Sequence[int],
                    out_size: Sequence[int] | None = None) -> Tensor:
    """Logits (B, K, *out_size) averaged over overlapping ``crop`` windows placed every ``stride`` pixels.

    A window larger than the image is clipped to it (the crop is then the image, without padding), as in mmseg.
    """
    batch, _, height, width = img.shape
    logits: Tensor | None = None
    count = img.new_zeros((batch, 1, height, width))
    for y1, y2, x1, x2 in slide_windows(height, width, crop, stride):
        crop_logits = encode_decode(model, img[:, :, y1:y2, x1:x2])
        if logits is None:
            logits = img.new_zeros((batch, crop_logits.shape[1], height, width))
        logits[:, :, y1:y2, x1:x2] += crop_logits
        count[:, :, y1:y2, x1:x2] += 1
    assert logits is not None and bool((count > 0).all())
    logits = logits / count
    return logits if out_size is None else _resize(logits, out_size)


def predict_logits(model: nn.Module, img: Tensor, out_size: Sequence[int], mode: str = "whole",
                   crop: Sequence[int] | None = None, stride: Sequence[int] | None = None) -> Tensor:
    """Class logits (B, K, *out_size) of one view by ``mode``: :func:`whole_inference`, or :func:`slide_inference`
    over ``crop`` windows every ``stride`` pixels."""
    if mode == "slide":
        if crop is None or stride is None:
            raise ValueError("slide inference needs crop and stride, e.g. crop=(1024, 1024) stride=(768, 768)")
        return slide_inference(model, img, crop, stride, out_size)
    if mode == "whole":
        return whole_inference(model, img, out_size)
    raise ValueError(f"inference mode must be 'whole' or 'slide', got '{mode}'")


def predict_probs(model: nn.Module, img: Tensor, out_size: Sequence[int], mode: str = "whole",
                  crop: Sequence[int] | None = None, stride: Sequence[int] | None = None,
                  flip: bool = False) -> Tensor:
    """Class probabilities (B, K, *out_size) of one view, mmseg ``inference``: the softmax of :func:`predict_logits`.

    ``flip=True`` runs the horizontally flipped image and flips the output back, so every view is aligned with the
    original image.
    """
    probs = channel_softmax(predict_logits(model, img.flip(-1) if flip else img, out_size, mode, crop, stride))
    return probs.flip(-1) if flip else probs


def channel_softmax(logits: Tensor) -> Tensor:
    """``logits.softmax(dim=1)``, computed along memory where the class axis is the innermost one.

    SegFormer (eager and fused) and fused TopFormer return channels-last logits, and the bilinear upsampling keeps
    that layout; PyTorch's softmax over dim 1 of such a map takes a strided path ~4.7× slower than the same softmax
    over the last axis of its (B, H, W, K) view (540 vs 117 ms for 150 classes at 512×683 on 2 threads,
    benchmarks/predict_pipeline.py) — at every evaluated image.
    """
    if logits.dim() == 4 and logits.stride(1) == 1 and logits.shape[1] > 1:
        return logits.permute(0, 2, 3, 1).softmax(dim=-1).permute(0, 3, 1, 2)
    return logits.softmax(dim=1)


def tta_probs(model: nn.Module, views: Sequence[Tensor], out_size: Sequence[int], mode: str = "whole",
              crop: Sequence[int] | None = None, stride: Sequence[int] | None = None, *,
              add_flipped: bool = True) -> Tensor:
    """Mean class probabilities (B, K, *out_size) over ``views`` (one image at several scales), with each view's
    flipped copy too when ``add_flipped``: mmseg ``aug_test`` with ``MultiScaleFlipAug``."""
    total: Tensor | None = None
    n = 0
    for view in views:
        for flipped in ((False, True) if add_flipped else (False,)):
            probs = predict_probs(model, view, out_size, mode, crop, stride, flip=flipped)
            total = probs if total is None else total.add_(probs)
            n += 1
    if total is None:
        raise ValueError("tta_probs needs at least one view")
    return total / n
