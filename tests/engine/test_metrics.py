"""ConfusionMatrix against a line-by-line numpy port of mmseg 0.x ``intersect_and_union`` /
``total_area_to_metrics``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgeseg.engine.metrics import ConfusionMatrix


def mmseg_intersect_and_union(pred, label, num_classes, ignore_index, reduce_zero_label):
    """mmseg/core/evaluation/metrics.py, with torch.histc(bins=K, min=0, max=K-1) as np.histogram."""
    label = label.astype(np.int64).copy()
    if reduce_zero_label:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    mask = label != ignore_index
    pred, label = pred[mask], label[mask]
    intersect = pred[pred == label]

    def hist(x: np.ndarray) -> np.ndarray:
        return np.histogram(x, bins=num_classes, range=(0, num_classes - 1))[0].astype(np.float64)

    area_intersect, area_pred, area_label = hist(intersect), hist(pred), hist(label)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def mmseg_metrics(pairs, num_classes, ignore_index=255, reduce_zero_label=False):
    totals = [np.zeros(num_classes) for _ in range(4)]
    for pred, label in pairs:
        for t, a in zip(totals, mmseg_intersect_and_union(pred, label, num_classes, ignore_index, reduce_zero_label)):
            t += a
    inter, union, _, area_label = totals
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"aAcc": inter.sum() / area_label.sum(), "IoU": inter / union, "Acc": inter / area_label}


@pytest.mark.parametrize("reduce_zero_label", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_matches_mmseg(reduce_zero_label, dtype):
    rng = np.random.default_rng(0)
    num_classes = 12
    pairs = []
    for _ in range(5):
        h, w = (int(v) for v in rng.integers(20, 60, size=2))
        label = rng.integers(0, num_classes - 2, size=(h, w))  # last 2 classes absent from labels
        label[rng.random((h, w)) < 0.15] = 255
        label[rng.random((h, w)) < 0.02] = num_classes + 3  # out of range, not ignore: counts in pred area only
        noise = rng.integers(0, num_classes - 1, size=(h, w))  # class K-1 never predicted
        pred = np.where(rng.random((h, w)) < 0.6, np.clip(label - int(reduce_zero_label), 0, num_classes - 2), noise)
        pairs.append((pred.astype(np.int64), label.astype(dtype)))
    ref = mmseg_metrics(pairs, num_classes, reduce_zero_label=reduce_zero_label)
    cm = ConfusionMatrix(num_classes, ignore_index=255, reduce_zero_label=reduce_zero_label)
    for pred, label in pairs:
        cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    out = cm.compute()
    assert np.isnan(ref["IoU"][-1]) and np.isnan(out["IoU"][-1])  # in no label, never predicted
    np.testing.assert_array_equal(np.isnan(out["IoU"]), np.isnan(ref["IoU"]))
    np.testing.assert_array_equal(np.isnan(out["Acc"]), np.isnan(ref["Acc"]))
    np.testing.assert_allclose(out["IoU"], ref["IoU"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["Acc"], ref["Acc"], rtol=0, atol=1e-12)
    assert out["aAcc"] == pytest.approx(ref["aAcc"], abs=1e-12)
    assert out["mIoU"] == pytest.approx(np.nanmean(ref["IoU"]), abs=1e-12)
    assert out["mAcc"] == pytest.approx(np.nanmean(ref["Acc"]), abs=1e-12)
    # the areas themselves, not only their ratios
    for mine, theirs in zip(cm.areas(), [sum(a) for a in zip(*(mmseg_intersect_and_union(
            pred, label, num_classes, 255, reduce_zero_label) for pred, label in pairs))]):
        np.testing.assert_array_equal(mine, theirs)


def test_negative_and_large_labels_take_generic_path():
    rng = np.random.default_rng(1)
    label = rng.integers(-3, 5, size=(30, 30))
    label[0, :5] = 100_000
    label[1, :5] = 255
    pred = rng.integers(0, 5, size=(30, 30))
    ref = mmseg_metrics([(pred, label)], 5)
    cm = ConfusionMatrix(5)
    cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    np.testing.assert_allclose(cm.compute()["IoU"], ref["IoU"], atol=1e-12)


def test_perfect_prediction_and_shape_check():
    label = torch.tensor([[0, 1, 255], [2, 2, 1]])
    cm = ConfusionMatrix(4)
    cm.update(label.clamp(max=3), label)
    out = cm.compute()
    assert out["mIoU"] == 1.0 and out["aAcc"] == 1.0
    assert math.isnan(out["IoU"][3]) and math.isnan(out["Acc"][3])
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
