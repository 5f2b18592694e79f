"""Whole / sliding-window / TTA inference (mmseg EncoderDecoder semantics) and dataset evaluation."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from edgeseg.config import EvalCfg
from edgeseg.data import ScenesDataset, TestTransform
from edgeseg.engine.evaluate import evaluate, metrics_table
from edgeseg.engine.inference import (
    channel_softmax,
    predict_probs,
    slide_inference,
    slide_windows,
    tta_probs,
    whole_inference,
    whole_labels,
)
from edgeseg.models import create_model, native


class Pointwise(nn.Module):
    """A 1×1 conv at full resolution: each output pixel depends on its input pixel only, so every window that covers
    a pixel predicts the same logits there and a correctly count-normalised slide equals the whole image."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, x):
        return self.conv(x)


def test_slide_grid_is_mmseg():
    # H=10, crop 4, stride 3: max(10-4+3-1, 0)//3 + 1 = 3 rows, the last shifted back inside the image; W=13: 4 columns
    rows, cols = [(0, 4), (3, 7), (6, 10)], [(0, 4), (3, 7), (6, 10), (9, 13)]
    assert slide_windows(10, 13, (4, 4), (3, 3)) == [(y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in cols]
    # (H − crop) a multiple of the stride: no window repeated at the border (2 rows × 3 columns)
    assert slide_windows(96, 128, (64, 64), (32, 32)) == [
        (0, 64, 0, 64), (0, 64, 32, 96), (0, 64, 64, 128), (32, 96, 0, 64), (32, 96, 32, 96), (32, 96, 64, 128)]
    # ADE20K's 512 × 683 at crop 512, stride 341: one row, the second window ending at the right edge
    assert slide_windows(512, 683, (512, 512), (341, 341)) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert slide_windows(5, 5, (8, 8), (6, 6)) == [(0, 5, 0, 5)]  # crop larger than the image: the image


class WindowMean(nn.Module):
    """Every output pixel is the mean of the whole input (per channel, then mixed): each window predicts its own
    constant, so the slide's average shows how often each window counts."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.mix = nn.Linear(3, num_classes)
        self.num_classes = num_classes

    def forward(self, x):
        return self.mix(x.mean(dim=(2, 3)))[:, :, None, None].expand(-1, -1, *x.shape[2:])


def test_slide_count_normalisation():
    torch.manual_seed(0)
    model = Pointwise().eval()
    img = torch.randn(2, 3, 10, 13)
    torch.testing.assert_close(slide_inference(model, img, (4, 4), (3, 3)), whole_inference(model, img),
                               rtol=0, atol=1e-6)
    # mmseg's loop, written out: each pixel averages the windows over it, each window counted once
    model = WindowMean().eval().requires_grad_(False)
    total, count = torch.zeros(2, 5, 10, 13), torch.zeros(1, 1, 10, 13)
    for y in (0, 3, 6):
        for x in (0, 3, 6, 9):
            total[:, :, y:y + 4, x:x + 4] += model(img[:, :, y:y + 4, x:x + 4])
            count[:, :, y:y + 4, x:x + 4] += 1
    slide = slide_inference(model, img, (4, 4), (3, 3))
    torch.testing.assert_close(slide, total / count, rtol=0, atol=1e-6)
    assert not torch.allclose(slide, total)  # the average over the windows, not their sum


def test_slide_equals_whole_when_crop_covers_image():
    torch.manual_seed(0)
    model = create_model("topformer-tiny", num_classes=4).eval()
    img = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        whole = whole_inference(model, img, (70, 100))
        slide = slide_inference(model, img, (64, 96), (48, 48), (70, 100))
    assert whole.shape == (1, 4, 70, 100)
    torch.testing.assert_close(slide, whole, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_channel_softmax_is_softmax_over_classes_in_either_layout(layout):
    logits = torch.randn(2, 7, 5, 6) * 4
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    probs = channel_softmax(logits)
    assert probs.shape == logits.shape and probs.stride() == logits.stride()
    assert torch.allclose(probs, torch.softmax(logits.contiguous(), dim=1), atol=1e-7)


@pytest.mark.parametrize("model_name", ["segformer-b0", "topformer-tiny"])
@pytest.mark.parametrize("out_size", [(64, 96), (100, 77)])  # the network input, and a second resize
def test_whole_labels_are_the_argmax_of_whole_inference(monkeypatch, model_name, out_size):
    """One pass where the native kernel runs (channels-last logits: fused models), PyTorch's resizes otherwise
    (eager TopFormer's logits are NCHW); the labels are the same."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=9).eval()
    img = torch.randn(2, 3, 64, 96)
    ran, kernel = [], native.resize_argmax
    monkeypatch.setattr(native, "resize_argmax", lambda *args: ran.append(kernel(*args)) or ran[-1])
    with torch.no_grad():
        for form in (model, model.fuse()):
            want = whole_inference(form, img, out_size).argmax(1)
            assert torch.equal(whole_labels(form, img, out_size), want)
    if native.available():
        assert ran[-1] is not None  # the fused form ran the kernel


def test_tta_probabilities():
    torch.manual_seed(0)
    model = Pointwise().eval()
    img = torch.randn(1, 3, 12, 16)
    single = predict_probs(model, img, (12, 16))
    torch.testing.assert_close(single.sum(1), torch.ones(1, 12, 16))
    # a pointwise model is flip-equivariant: flipping the input and the output back changes nothing
    torch.testing.assert_close(predict_probs(model, img, (12, 16), flip=True), single, rtol=0, atol=1e-6)
    small = torch.nn.functional.interpolate(img, size=(6, 8), mode="bilinear", align_corners=False)
    probs = tta_probs(model, [small, img], (12, 16), add_flipped=True)
    assert probs.shape == (1, 5, 12, 16)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 12, 16))
    expected = (predict_probs(model, small, (12, 16)) + predict_probs(model, small, (12, 16), flip=True)
                + 2 * single) / 4
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)


def test_evaluate_one_view_takes_the_labels_of_the_logits(monkeypatch):
    """A single whole view is evaluated from its logits' argmax in one native pass (a fused SegFormer's logits are
    channels-last); a slide whose crop covers the image goes through the probabilities: the same metrics."""
    torch.manual_seed(0)
    val = ScenesDataset(split="val", num_images=2, size=(48, 64), transform=TestTransform((96, 48)))
    model = create_model("segformer-b0", num_classes=val.num_classes).eval().fuse()
    ran, kernel = [], native.resize_argmax
    monkeypatch.setattr(native, "resize_argmax", lambda *args: ran.append(kernel(*args)) or ran[-1])
    whole = evaluate(model, val, EvalCfg(mode="whole"))
    assert len(ran) == 2 and (not native.available() or all(r is not None for r in ran))
    assert evaluate(model, val, EvalCfg(mode="slide", crop_size=(64, 64), stride=(32, 32))) == whole
    assert len(ran) == 2


def test_evaluate_whole_slide_and_tta():
    torch.manual_seed(0)
    val = ScenesDataset(split="val", num_images=3, size=(48, 64), transform=TestTransform((96, 48)))
    model = create_model("topformer-tiny", num_classes=val.num_classes)
    whole = evaluate(model, val, EvalCfg(mode="whole"))
    assert model.training  # evaluate restores the mode it found
    assert whole["num_images"] == 3 and set(whole["per_class"]) == set(val.classes)
    assert 0 <= whole["mIoU"] <= 100 and 0 <= whole["aAcc"] <= 100
    # the crop covers the (48, 64) test image: identical predictions
    slide = evaluate(model, val, EvalCfg(mode="slide", crop_size=(64, 64), stride=(32, 32)))
    assert slide == whole
    tta = evaluate(model, val, EvalCfg(tta=True, tta_ratios=(0.5, 1.0)))
    assert tta["num_images"] == 3 and tta["mIoU"] is not None
    # a flip-equivariant model at ratio 1: the flipped view predicts what the view does, so TTA changes nothing
    pointwise = Pointwise(val.num_classes).eval()
    assert evaluate(pointwise, val, EvalCfg(tta=True, tta_ratios=(1.0,))) == evaluate(pointwise, val, EvalCfg())
    assert "mIoU" in metrics_table(whole)
    with pytest.raises(ValueError, match="slide"):
        predict_probs(model, torch.zeros(1, 3, 8, 8), (8, 8), mode="slide")


def test_evaluate_warns_of_labels_that_are_neither_a_class_nor_ignore():
    """mmseg scores such pixels (in the predicted class's area only) without a word; the count stays mmseg's, and the
    first image holding one is named."""
    val = ScenesDataset(split="val", num_images=2, size=(48, 64), transform=TestTransform((96, 48)))
    assert int(val[0]["gt"].max()) >= 3  # scenes labels reach class 7
    with pytest.warns(UserWarning, match=rf"^the label of image {val.sample_name(0)} \(and maybe others\) holds "
                                         r"values >= 3 that are not the ignore value 255: scored as mmseg scores them"):
        evaluate(Pointwise(3).eval(), val, EvalCfg())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(Pointwise(val.num_classes).eval(), val, EvalCfg())
