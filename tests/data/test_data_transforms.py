from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeseg.data import (
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
from edgeseg.data.transforms import hsv_to_rgb, rgb_to_hsv


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------- resizing
def test_rescale_size_follows_mmcv_rule():
    # factor = min(long / max(h, w), short / min(h, w)); sides int(x * f + 0.5)
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)  # factor 1
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)  # f = 512/375: 500 f = 682.67
    assert rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert rescale_size(1024, 2048, (1024, 512)) == (512, 1024)
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side binds: f = 2.048
    assert rescale_size(300, 400, (512, 512)) == (384, 512)  # both bounds given by the same number
    assert rescale_size(70, 100, (200, 96)) == (96, 137)  # 100 · 96/70 = 137.14: rounded, not ceiled
    assert rescale_size(1, 4000, (128, 64)) == (1, 128)  # a strip keeps one row (0 in mmcv, which then fails)


@pytest.mark.parametrize("src,dst", [((17, 23), (40, 31)), ((40, 60), (13, 29)), ((32, 48), (64, 96))])
def test_resize_bilinear_is_half_pixel_bilinear(src, dst):
    img = _image(*src)
    ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].double(), size=dst, mode="bilinear",
                        align_corners=False)[0].permute(1, 2, 0).numpy()
    out = resize_bilinear(img, dst)
    assert out.shape == (*dst, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.float64) - ref).max() <= 0.5 + 1e-3


def test_resize_window_equals_resize_then_crop():
    img = _image(30, 40)
    lab = np.random.default_rng(1).integers(0, 5, (30, 40)).astype(np.uint8)
    size, window = (71, 95), (13, 50, 20, 77)
    y1, y2, x1, x2 = window
    np.testing.assert_array_equal(resize_bilinear(img, size, window), resize_bilinear(img, size)[y1:y2, x1:x2])
    np.testing.assert_array_equal(resize_nearest(lab, size, window), resize_nearest(lab, size)[y1:y2, x1:x2])


@pytest.mark.parametrize("dst", [(45, 61), (11, 17)])
def test_resize_nearest_is_opencv_nearest(dst):
    lab = np.random.default_rng(2).integers(0, 150, (30, 40)).astype(np.uint8)
    # torch's legacy "nearest" uses OpenCV's floor(dst * in / out) rule.
    ref = F.interpolate(torch.from_numpy(lab)[None, None].float(), size=dst, mode="nearest")[0, 0].byte().numpy()
    np.testing.assert_array_equal(resize_nearest(lab, dst), ref)
    assert set(np.unique(resize_nearest(lab, dst))) <= set(np.unique(lab))


def test_resize_nearest_takes_opencvs_taps_where_rounding_decides():
    # 6 → 34: tap 17 is at exactly 3.0, which OpenCV's inverted scale puts at 2.99…: it takes pixel 2 (from
    # cv2.resize(..., interpolation=INTER_NEAREST), OpenCV 4.5.5); floor(17 · 6 / 34) would take pixel 3
    opencv = [0] * 6 + [1] * 6 + [2] * 6 + [3] * 5 + [4] * 6 + [5] * 5
    lab = (np.arange(6)[:, None] * 10 + np.arange(6)[None, :]).astype(np.uint8)
    expected = np.array(opencv)[:, None] * 10 + np.array(opencv)[None, :]
    np.testing.assert_array_equal(resize_nearest(lab, (34, 34)), expected)


# ------------------------------------------------------------------------------------------------ test time
def test_test_transform_keeps_ratio_and_label_size():
    img, gt = _image(32, 48), np.ones((32, 48), np.uint8)
    x, y, info = TestTransform(scale=(96, 40))(img, gt)
    assert x.shape == (3, 40, 60)  # f = min(96/48, 40/32) = 1.25
    assert info["img_shape"] == (40, 60) and info["scale_factor"] == (60 / 48, 40 / 32)
    assert y.shape == (32, 48) and y.dtype == torch.int64  # evaluation is at the original size


def test_test_transform_size_divisor_rounds_up():
    img = _image(32, 48)
    x, y, info = TestTransform(scale=(96, 40), size_divisor=32)(img)
    assert x.shape == (3, 64, 64) and y is None  # 40x60 -> next multiples of 32
    x, _, _ = TestTransform(scale=(96, 40), size_divisor=20)(img)
    assert x.shape == (3, 40, 60)  # already multiples: unchanged


def test_test_transform_normalises_rgb():
    img = np.empty((8, 8, 3), np.uint8)
    img[...] = (10, 120, 250)
    x, _, _ = TestTransform(scale=(8, 8))(img)
    expected = [(v - m) / s for v, m, s in zip((10, 120, 250), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected, dtype=torch.float32), atol=1e-5)


# ----------------------------------------------------------------------------------------------- training
def test_train_transform_crop_size_and_padding():
    img, gt = _image(20, 30), np.zeros((20, 30), np.uint8)
    t = TrainTransform((64, 48), scale=(30, 20), ratio_range=None, cat_max_ratio=1.0, photometric=False)
    x, y, info = t(img, gt, np.random.default_rng(0))
    assert x.shape == (3, 64, 48) and y.shape == (64, 48)
    assert info["img_shape"] == (20, 30)
    assert torch.all(x[:, 20:, :] == 0) and torch.all(x[:, :, 30:] == 0)  # image pad 0 after Normalize
    assert torch.all(y[20:, :] == 255) and torch.all(y[:, 30:] == 255)  # label pad = ignore
    assert torch.all(y[:20, :30] == 0)


def test_train_transform_resize_ratio_range():
    img, gt = _image(40, 60), np.zeros((40, 60), np.uint8)
    t = TrainTransform((8, 8), scale=(120, 40), ratio_range=(0.5, 2.0), cat_max_ratio=1.0, photometric=False)
    rng = np.random.default_rng(0)
    heights = [t(img, gt, rng)[2]["img_shape"][0] for _ in range(50)]
    # scale = (int(120 r), int(40 r)), the short side binds: h = 40 r rounded.
    assert 19 <= min(heights) < 26 and 70 < max(heights) <= 80


def _crop_ratio(y: torch.Tensor) -> tuple[int, float]:
    counts = torch.bincount(y[y != 255].flatten())
    counts = counts[counts > 0]
    return len(counts), float(counts.max() / counts.sum())


def test_cat_max_ratio_rejects_dominated_crops():
    img = _image(100, 100)
    gt = np.full((100, 100), 1, np.uint8)
    gt[:, 70:] = 2  # class 1 dominates most 30x30 crops
    gt[:5] = 255
    def crops(ratio: float) -> list[tuple[int, float]]:
        t = TrainTransform((30, 30), scale=(100, 100), ratio_range=None, cat_max_ratio=ratio, flip_prob=0.0,
                           photometric=False)
        rng = np.random.default_rng(0)
        return [_crop_ratio(t(img, gt, rng)[1]) for _ in range(40)]

    strict = crops(0.75)
    loose = crops(1.0)
    ok = lambda c: c[0] > 1 and c[1] < 0.75  # noqa: E731
    # One draw is mixed enough with p ~ 0.21 (crop straddling x = 70 by > 7.5 px on each side); 10 redraws
    # (plus the unchecked 11th) make it ~0.92.
    assert sum(map(ok, strict)) >= 30
    assert sum(map(ok, loose)) <= 16


def test_cat_max_ratio_ignores_255():
    t = TrainTransform((4, 4), cat_max_ratio=0.75)
    crop = np.full((10, 10), 255, np.uint8)
    crop[0, :5], crop[1, :5] = 1, 2  # 80 % ignore, classes 1 and 2 balanced
    assert t._crop_ok(crop)
    crop[1, :5] = 1
    assert not t._crop_ok(crop)  # one class only
    crop[1, :4] = 2  # 6 vs 4 of 10 non-ignored: 0.6 < 0.75
    assert t._crop_ok(crop)


def test_flip_moves_image_and_mask_together():
    gt = np.random.default_rng(3).integers(0, 20, (24, 36)).astype(np.uint8)
    img = np.repeat((gt * 10)[..., None], 3, axis=2).astype(np.uint8)
    t = TrainTransform((16, 16), scale=(36, 24), ratio_range=None, cat_max_ratio=1.0, photometric=False,
                       mean=(0, 0, 0), std=(1, 1, 1))
    rng = np.random.default_rng(0)
    flips = set()
    for _ in range(12):
        x, y, info = t(img, gt, rng)
        flips.add(info["flip"])
        assert torch.equal(x[0], (y * 10).float())
        y1, y2, x1, x2 = info["crop"]
        expected = torch.from_numpy(gt[y1:y2, x1:x2].astype(np.int64))
        assert torch.equal(y, expected.flip(-1) if info["flip"] else expected)
    assert flips == {True, False}


def test_train_transform_is_reproducible_from_the_generator():
    img = _image(50, 70)
    gt = np.random.default_rng(1).integers(0, 4, (50, 70)).astype(np.uint8)
    t = TrainTransform((32, 32), scale=(140, 50))
    a = t(img, gt, np.random.default_rng(7))
    b = t(img, gt, np.random.default_rng(7))
    c = t(img, gt, np.random.default_rng(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_worker_rng_follows_torch_seed():
    torch.manual_seed(123)
    first = worker_rng().random(3)
    torch.manual_seed(123)
    again = worker_rng().random(3)
    torch.manual_seed(124)
    other = worker_rng().random(3)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


# -------------------------------------------------------------------------------------------- photometric
def test_hsv_matches_colorsys_in_opencv_units():
    px = _image(1, 4000, seed=5)
    hsv = rgb_to_hsv(px)[0].astype(np.float64)
    ref = np.array([colorsys.rgb_to_hsv(*(c / 255.0)) for c in px[0].astype(np.float64)])
    dh = np.abs((hsv[:, 0] / 180.0 - ref[:, 0] + 0.5) % 1.0 - 0.5) * 180.0
    # OpenCV's 12-bit fixed point: rounding (0.5) plus the reciprocal tables' error, ≤ 5·255 · 0.5 / 2¹² for the hue
    # numerator (≤ 5·diff) and 255 · 0.5 / 2¹² for the saturation
    assert dh.max() <= 0.5 + 5 * 255 * 0.5 / 4096
    assert np.abs(hsv[:, 1] - ref[:, 1] * 255).max() <= 0.5 + 255 * 0.5 / 4096
    assert np.array_equal(hsv[:, 2], px[0].max(axis=1))
    back = np.array([colorsys.hsv_to_rgb(h / 180.0, s / 255.0, v / 255.0) for h, s, v in hsv]) * 255.0
    err = hsv_to_rgb(hsv.astype(np.uint8)[None])[0] - back  # OpenCV truncates: within one level below
    assert -1.0 - 1e-4 < err.min() and err.max() < 1e-4


# (input, cv2.cvtColor output) from OpenCV 4.5.5 on an AVX2/FMA CPU, in 256-pixel rows (no row tail, which OpenCV
# converts one pixel at a time and rounds); the first six of each are ones the rounding conversions before got wrong
HSV_TO_RGB_OPENCV = [((136, 112, 182), (144, 102, 182)), ((92, 124, 76), (39, 73, 76)),
                     ((171, 36, 225), (225, 193, 202)), ((85, 227, 81), (8, 81, 68)),
                     ((26, 67, 214), (214, 206, 157)), ((6, 150, 240), (240, 127, 98)),
                     # two that only OpenCV's fused multiply-adds give, and two hues past 179 (wrapped by sector)
                     ((5, 166, 153), (153, 70, 53)), ((115, 51, 30), (24, 25, 30)),
                     ((197, 255, 98), (98, 55, 0)), ((193, 200, 162), (162, 90, 34))]
RGB_TO_HSV_OPENCV = [((134, 12, 210), (139, 240, 210)), ((46, 7, 218), (125, 247, 218)),
                     ((190, 165, 133), (17, 76, 190)), ((75, 15, 159), (132, 231, 159)),
                     ((77, 213, 129), (72, 163, 213)), ((43, 22, 200), (123, 227, 200))]


@pytest.mark.parametrize("convert, pairs", [(hsv_to_rgb, HSV_TO_RGB_OPENCV), (rgb_to_hsv, RGB_TO_HSV_OPENCV)])
def test_hsv_conversions_are_opencvs(convert, pairs):
    """mmseg's saturation and hue steps go through OpenCV's uint8 conversions (mmcv's bgr2hsv / hsv2bgr)."""
    inputs, expected = (np.array([[p[i] for p in pairs]], dtype=np.uint8) for i in (0, 1))
    np.testing.assert_array_equal(convert(inputs), expected)


def test_photometric_distortion_ranges():
    img = _image(16, 16)
    pm = PhotoMetricDistortion()
    rng = np.random.default_rng(0)
    outs = [pm(img, rng) for _ in range(20)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, img) for o in outs)
    # Brightness alone: a constant image moves by at most ±32.
    grey = np.full((4, 4, 3), 128, np.uint8)
    only_brightness = PhotoMetricDistortion(contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=0)
    shifts = {int(only_brightness(grey, rng)[0, 0, 0]) - 128 for _ in range(40)}
    assert max(abs(s) for s in shifts) <= 32 and len(shifts) > 5


def test_photometric_distortion_contrast_saturation_and_hue_each_alone():
    rng = np.random.default_rng(0)
    # Contrast alone multiplies every value by one α in [0.5, 1.5] (truncated to uint8, as mmseg's astype)
    only_contrast = PhotoMetricDistortion(brightness_delta=0, saturation_range=(1, 1), hue_delta=0)
    img = np.array([[[50, 50, 50], [100, 100, 100]]], np.uint8)  # greys: the HSV round trips leave them alone
    outs = [only_contrast(img, rng)[0, :, 0].astype(int) for _ in range(40)]
    assert all(25 <= a <= 75 and 0 <= b - 2 * a <= 1 for a, b in outs)  # ⌊100α⌋ − 2⌊50α⌋ ∈ {0, 1}
    assert len({a for a, _ in outs}) > 5
    # Saturation alone scales HSV's S by [0.5, 1.5] and keeps V; a grey pixel (S = 0) stays grey
    only_saturation = PhotoMetricDistortion(brightness_delta=0, contrast_range=(1, 1), hue_delta=0)
    img = np.array([[[200, 100, 100], [90, 90, 90]]], np.uint8)
    s0 = int(rgb_to_hsv(img)[0, 0, 1])
    for _ in range(40):
        out = only_saturation(img, rng)
        hsv = rgb_to_hsv(out)[0].astype(int)
        assert 0.5 * s0 - 1 <= hsv[0, 1] <= 1.5 * s0 + 1 and abs(hsv[0, 2] - 200) <= 1
        assert (out[0, 1] == 90).all()
    # Hue alone shifts OpenCV's hue (0..179) by an integer in [-18, 18), wrapping: pure red lands in 162..179, 0..17
    only_hue = PhotoMetricDistortion(brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1))
    red = np.array([[[255, 0, 0]]], np.uint8)
    hues = {int(rgb_to_hsv(only_hue(red, rng))[0, 0, 0]) for _ in range(200)}
    assert hues <= set(range(162, 180)) | set(range(0, 18)) and min(hues) < 10 and max(hues) > 170


def test_convert_table_equals_mmseg_float_formula():
    from edgeseg.data.transforms import _convert

    x = _image(20, 20, seed=9)
    for alpha, beta in ((1.37, -20.5), (0.51, 0.0), (1.0, 31.9), (1.5, 0.0)):
        ref = np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)  # truncation, as mmseg
        np.testing.assert_array_equal(_convert(x, alpha, beta), ref)
