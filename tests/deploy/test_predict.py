"""Segmenter: the test pipeline around a model, and the predict command."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import edgeseg
from edgeseg.checkpoint import set_labels
from edgeseg.cli import main
from edgeseg.deploy.benchmark import random_weights_
from edgeseg.deploy.predict import Segmenter
from edgeseg.engine.inference import predict_probs, slide_inference, whole_inference


def test_segmenter_matches_resize_then_model_then_resize_back(tmp_path):
    torch.manual_seed(0)
    model = edgeseg.create_model("topformer-tiny", num_classes=5).eval()
    rgb = (np.random.default_rng(0).random((70, 100, 3)) * 255).astype(np.uint8)
    seg = Segmenter(model, scale=(200, 96), fuse=False)
    labels = seg(rgb)
    assert labels.shape == (70, 100) and labels.dtype == np.uint8 and labels.max() < 5
    img, _, _ = seg.transform(rgb)
    assert img.shape[-2:] == (96, 137)  # keep-ratio: short side 96
    with torch.inference_mode():
        expected = whole_inference(model, img[None], (70, 100)).argmax(1)[0].numpy()
    assert np.array_equal(labels, expected)
    assert seg.overlay(rgb, labels).shape == rgb.shape


def test_segmenter_takes_gray_rgba_and_tensor_images_as_pil_reads_them():
    model = edgeseg.create_model("topformer-tiny", num_classes=5).eval()
    seg = Segmenter(model, scale=(128, 64), fuse=False)
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (40, 56, 4), dtype=np.uint8)
    gray = rgba[:, :, 0]
    assert np.array_equal(seg(gray), seg(Image.fromarray(gray)))  # PIL's "L" → RGB: three equal channels
    assert np.array_equal(seg(rgba), seg(Image.fromarray(rgba)))  # PIL's RGBA → RGB drops the alpha
    assert np.array_equal(seg(torch.from_numpy(rgba[:, :, :3]).permute(2, 0, 1)), seg(rgba[:, :, :3]))
    with pytest.raises(ValueError, match=r"expected uint8 pixels \(0–255\), got float32"):
        seg(rgba[:, :, :3].astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"got \(40, 56, 2\)"):
        seg(rgba[:, :, :2])
    with pytest.raises(ValueError, match=r"expected a C×H×W uint8 image tensor .*, got torch.bfloat16 \(3, 40, 56\)"):
        seg(torch.zeros(3, 40, 56, dtype=torch.bfloat16))


def test_a_16_bit_or_float_pil_image_is_read_as_its_file_is(tmp_path):
    model = edgeseg.create_model("topformer-tiny", num_classes=5).eval()
    seg = Segmenter(model, scale=(128, 64), fuse=False)
    grey = (np.arange(40 * 56).reshape(40, 56) * 29).astype(np.uint16)  # 0…65 k: Pillow's RGB would clip it white
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode == "I;16"
        assert np.array_equal(seg(im), seg(tmp_path / "grey16.png"))
        assert np.array_equal(seg(im), seg(np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2)))
    with pytest.raises(ValueError, match=r"^the F image given holds floating-point pixels: convert it to 8-bit RGB$"):
        seg(Image.fromarray(grey.astype(np.float32)))


def test_segmenter_slides_windows_as_mmseg_slide_inference():
    model = random_weights_(edgeseg.create_model("topformer-tiny", num_classes=5)).eval()  # labels that vary
    rgb = (np.random.default_rng(0).random((70, 100, 3)) * 255).astype(np.uint8)
    seg = Segmenter(model, scale=(200, 96), fuse=False, crop_size=(64, 64), stride=(40, 40))
    img, _, _ = seg.transform(rgb)  # 96 × 137: 2 × 3 windows
    with torch.inference_mode():
        logits = slide_inference(model, img[None], (64, 64), (40, 40), (70, 100))
        probs = predict_probs(model, img[None], (70, 100), "slide", (64, 64), (40, 40))
        whole = whole_inference(model, img[None], (70, 100))
    assert seg.mode == "slide" and torch.equal(seg.logits(rgb), logits[0])
    assert torch.equal(seg.probabilities(rgb), probs[0])
    assert np.array_equal(seg(rgb), probs.argmax(1)[0].numpy())
    assert not torch.allclose(logits, whole, atol=1e-3)  # the windows see other context than the whole image
    assert (seg(rgb) != whole.argmax(1)[0].numpy()).mean() > 0.01  # ... and their labels differ
    with pytest.raises(ValueError, match="crop_size and stride together"):
        Segmenter(model, crop_size=(64, 64))
    with pytest.raises(ValueError, match="each stride at most its crop"):
        Segmenter(model, crop_size=(64, 64), stride=(80, 40))


@pytest.mark.parametrize("name", ["topformer-tiny", "segformer-b0"])
def test_segmenter_runs_the_fused_form_and_leaves_the_model_alone(name):
    torch.manual_seed(0)
    model = edgeseg.create_model(name, num_classes=5).eval()
    rgb = (np.random.default_rng(0).random((70, 100, 3)) * 255).astype(np.uint8)
    fused, eager = Segmenter(model, scale=(200, 96)), Segmenter(model, scale=(200, 96), fuse=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.model.modules())  # BN folded
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) and eager.model is model
    assert torch.allclose(fused.probabilities(rgb), eager.probabilities(rgb), atol=2e-5)


def test_photos_are_segmented_upright_as_viewers_show_them(tmp_path):
    """A camera JPEG stored landscape with EXIF orientation 6 (rotate 90°) is shown portrait: its labels and overlay
    are portrait too."""
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray((np.random.default_rng(2).random((40, 64, 3)) * 255).astype(np.uint8)).save(path, exif=exif)
    seg = Segmenter(edgeseg.create_model("topformer-tiny", num_classes=3), scale=(128, 64))
    labels = seg(path)
    assert labels.shape == (64, 40) and seg.overlay(path, labels).shape == (64, 40, 3)
    assert np.array_equal(seg(Image.open(path)), labels)  # the opened image as its path


def test_ade20k_sized_model_gets_ade20k_names():
    seg = Segmenter(edgeseg.create_model("topformer-tiny"))
    assert seg.class_names[0] == "wall" and len(seg.palette) == 150


def test_the_models_own_labels_win_over_a_dataset_guess():
    names = [f"part_{i}" for i in range(150)]  # 150 classes, but not ADE20K's
    model = set_labels(edgeseg.create_model("topformer-tiny"), names, [(i, i, i) for i in range(150)])
    seg = Segmenter(model)
    assert seg.class_names == names and seg.palette == [(i, i, i) for i in range(150)]
    del model.palette  # its own names without a palette: not ADE20K's colours either
    ade = Segmenter(edgeseg.create_model("topformer-tiny")).palette
    assert Segmenter(model).palette != ade
    # ADE20K's own names, as a Hugging Face id2label spells them (case, spaces): ADE20K's colours
    model.class_names = [n.strip().capitalize() for n in Segmenter(edgeseg.create_model("topformer-tiny")).class_names]
    assert Segmenter(model).palette == ade


def test_predict_cli_colours_with_the_checkpoints_palette(tmp_path):
    model = set_labels(edgeseg.create_model("topformer-tiny", num_classes=2), ["a", "b"], [(9, 8, 7), (6, 5, 4)])
    ckpt = edgeseg.save_checkpoint(tmp_path / "m.pth", model)
    img = tmp_path / "a.jpg"
    Image.fromarray((np.random.default_rng(1).random((64, 80, 3)) * 255).astype(np.uint8)).save(img)
    assert main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "out"), "--scale", "128", "64"]) == 0
    assert Image.open(tmp_path / "out" / "a.png").getpalette()[:6] == [9, 8, 7, 6, 5, 4]


def test_predict_and_eval_take_a_device(tmp_path, capsys):
    ckpt = edgeseg.save_checkpoint(tmp_path / "m.pth", edgeseg.create_model("topformer-tiny", num_classes=4))
    img = tmp_path / "a.jpg"
    Image.fromarray((np.random.default_rng(1).random((64, 80, 3)) * 255).astype(np.uint8)).save(img)
    out = ["--out", str(tmp_path / "out"), "--scale", "128", "64"]
    assert main(["predict", str(ckpt), str(img), *out, "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "a.png").is_file()
    capsys.readouterr()
    for device, message in (("banana", "not a device"), ("cuda:0", "CUDA is not available")):
        if device.startswith("cuda") and torch.cuda.is_available():
            continue
        assert main(["predict", str(ckpt), str(img), *out, "--device", device]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_predict_cli_writes_palette_pngs(tmp_path):
    model = random_weights_(edgeseg.create_model("topformer-tiny", num_classes=4))  # a fresh head: one class
    ckpt = edgeseg.save_checkpoint(tmp_path / "m.pth", model)
    img = tmp_path / "a.jpg"
    Image.fromarray((np.random.default_rng(1).random((64, 80, 3)) * 255).astype(np.uint8)).save(img)
    assert main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "out"), "--scale", "128", "64"]) == 0
    label = Image.open(tmp_path / "out" / "a.png")
    assert label.mode == "P" and label.size == (80, 64) and np.array(label).max() < 4
    assert (tmp_path / "out" / "a_overlay.jpg").is_file()
    # the labels are the Segmenter's on the same image: fuse()'s form by default, the eager model with --no-fuse
    loaded = edgeseg.load_model(ckpt)
    assert np.array_equal(np.array(label), Segmenter(loaded, scale=(128, 64))(img))
    assert main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "eager"), "--scale", "128", "64",
                 "--no-fuse"]) == 0
    eager = np.array(Image.open(tmp_path / "eager" / "a.png"))
    assert np.array_equal(eager, Segmenter(loaded, scale=(128, 64), fuse=False)(img))
    assert len(np.unique(eager)) > 1  # a map with something in it to compare


def test_predict_cli_takes_a_folder(tmp_path, capsys):
    model = edgeseg.create_model("topformer-tiny", num_classes=4)
    ckpt = edgeseg.save_checkpoint(tmp_path / "m.pth", model)
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("b.png", "a.JPG"):
        Image.fromarray((np.random.default_rng(1).random((64, 80, 3)) * 255).astype(np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    assert main(["predict", str(ckpt), str(folder), "--out", str(tmp_path / "out"), "--scale", "128", "64"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "a_overlay.jpg", "b.png", "b_overlay.jpg"]
    assert capsys.readouterr().out.splitlines()[0].startswith(str(folder / "a.JPG"))  # sorted by name
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(ckpt), str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no images" in err and str(tmp_path / "empty") in err
    # two inputs named alike would write one file: refused before anything runs
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b.jpg")
    assert main(["predict", str(ckpt), str(folder), str(tmp_path / "b.jpg"), "--out", str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "b.png" in err and "b.jpg" in err and not (tmp_path / "two").exists()
    # a video writes <stem>/ and <stem>_overlay.mp4: no clash with an image of its stem (it fails later, unreadable)
    (tmp_path / "b.mp4").write_bytes(b"not a video")
    assert main(["predict", str(ckpt), str(tmp_path / "b.mp4"), str(tmp_path / "b.jpg"), "--out",
                 str(tmp_path / "three")]) == 2
    assert "would both write" not in capsys.readouterr().err


def test_predict_recursive_keeps_the_subfolders(tmp_path, capsys):
    """Cityscapes' leftImg8bit/val/<city>/ layout: --recursive predicts every subfolder into the same subfolder of
    --out, so images named alike in two cities stay apart; without it the folder's error says to pass it."""
    ckpt = edgeseg.save_checkpoint(tmp_path / "m.pth", edgeseg.create_model("topformer-tiny", num_classes=4))
    val = tmp_path / "val"
    for city in ("bonn", "lindau/part"):
        (val / city).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(val / city / "a.png")
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(val), "--out", str(out), "--scale", "64", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--recursive" in err and not out.exists()
    assert main(["predict", str(ckpt), str(val), "--out", str(out), "--scale", "64", "32", "-r"]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["bonn/a.png", "bonn/a_overlay.jpg", "lindau/part/a.png", "lindau/part/a_overlay.jpg"]
    with Image.open(out / "lindau/part/a.png") as label:
        assert label.size == (40, 32)
    assert capsys.readouterr().out.splitlines()[0].startswith(str(val / "bonn" / "a.png"))
    # predictions inside the searched folder are not inputs of the next run
    for _ in range(2):
        assert main(["predict", str(ckpt), str(val), "--out", str(val / "pred"), "--scale", "64", "32", "-r"]) == 0
    assert (val / "pred" / "lindau" / "part" / "a.png").is_file() and not (val / "pred" / "pred").exists()


def test_predict_recursive_follows_linked_folders_once(tmp_path):
    from edgeseg.deploy.predict import expand_inputs

    shared = tmp_path / "shared"
    shared.mkdir()
    Image.new("RGB", (8, 8)).save(shared / "b.png")
    (shared / "loop").symlink_to(shared, target_is_directory=True)  # a link back up the tree
    top = tmp_path / "top"
    top.mkdir()
    Image.new("RGB", (8, 8)).save(top / "a.png")
    (top / "linked").symlink_to(shared, target_is_directory=True)
    (top / "real").mkdir()
    Image.new("RGB", (8, 8)).save(top / "real" / "c.png")
    (top / "0link").symlink_to(top / "real", target_is_directory=True)  # listed first, walked after the folder
    found = [(str(p.relative_to(top)), str(o.relative_to(tmp_path))) for p, o in expand_inputs([top], tmp_path / "o",
                                                                                                recursive=True)]
    assert found == [("a.png", "o"), ("linked/b.png", "o/linked"), ("real/c.png", "o/real")]


def test_missing_or_damaged_image_is_one_line(tmp_path, capsys):
    model = edgeseg.create_model("topformer-tiny", num_classes=4)
    ckpt = edgeseg.save_checkpoint(tmp_path / "m.pth", model)
    assert main(["predict", str(ckpt), str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "out")]) == 2
    assert "nope.jpg" in capsys.readouterr().err
    (tmp_path / "text.jpg").write_text("not an image")
    assert main(["predict", str(ckpt), str(tmp_path / "text.jpg"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "text.jpg could not be read" in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def video_io():
    """imageio with its ffmpeg binary (the [video] extra, part of [dev]): missing it fails in CI, skips elsewhere."""
    try:
        import imageio
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("the [video] extra is not installed in CI")
        pytest.skip("the [video] extra (imageio, imageio-ffmpeg) is not installed")
    return imageio


def test_predict_video_writes_label_pngs_and_overlay_video(tmp_path, video_io):
    # Smooth frames with a moving block (4:2:0 H.264 keeps those close); odd sides: the output is padded, not resized
    yy, xx = np.mgrid[:47, :65]
    frames = np.stack([np.stack([xx * 3, yy * 5, np.full_like(xx, 60 * t)], -1) for t in range(3)]).astype(np.uint8)
    for t in range(3):
        frames[t, 10:30, 8 + 10 * t:30 + 10 * t] = (230, 40, 40)
    video = tmp_path / "clip.avi"
    with video_io.get_writer(video, "ffmpeg", fps=5, codec="png", pixelformat="rgb24", macro_block_size=1) as w:
        for frame in frames:  # lossless: the frames decoded are these
            w.append_data(frame)
    model = edgeseg.create_model("topformer-tiny", num_classes=4)
    ckpt = edgeseg.save_checkpoint(tmp_path / "m.pth", model)
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(video), "--out", str(out), "--scale", "128", "64"]) == 0
    segmenter = Segmenter(edgeseg.load_model(ckpt), scale=(128, 64))
    labels = sorted((out / "clip").glob("*.png"))
    assert [p.name for p in labels] == ["000000.png", "000001.png", "000002.png"]
    for path, frame in zip(labels, frames):
        assert (np.array(Image.open(path)) == segmenter(frame)).all()
    reader = video_io.get_reader(out / "clip_overlay.mp4", "ffmpeg")
    shown = [f for f in reader]
    assert reader.get_meta_data()["fps"] == 5 and len(shown) == 3 and shown[0].shape == (48, 66, 3)
    # H.264 is lossy: the overlay matches on average, and its padding row and column repeat the last ones
    want = segmenter.overlay(frames[0], segmenter(frames[0]))
    assert np.abs(shown[0][:47, :65].astype(int) - want).mean() < 8  # ~1.6 here; the raw frame is ~48 away
    assert np.abs(shown[0][47].astype(int) - shown[0][46]).mean() < 8
    assert np.abs(shown[0][:, 65].astype(int) - shown[0][:, 64]).mean() < 8
    assert sorted(p.name for p in out.iterdir()) == ["clip", "clip_overlay.mp4"]  # no partial file left


def test_video_errors_are_one_line(tmp_path, capsys, monkeypatch, video_io):
    model = edgeseg.create_model("topformer-tiny", num_classes=4)
    ckpt = edgeseg.save_checkpoint(tmp_path / "m.pth", model)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    assert main(["predict", str(ckpt), str(broken), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.mp4" in err
    assert not list((tmp_path / "out").iterdir())  # no label folder, no partial video
    monkeypatch.setitem(sys.modules, "imageio", None)  # as without the extra
    assert main(["predict", str(ckpt), str(broken), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'edgeseg[video]'" in err


def test_predict_config_of_a_folder_recipe_checks_and_brings_its_class_list(tmp_path, capsys):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "dataset.yaml").write_text("classes: [sky, sea, sand]\n"
                                       "palette: [[0, 0, 200], [0, 90, 160], [220, 200, 150]]\n")
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"model:\n  name: topformer-tiny\ndata:\n  dataset: folder\n  root: {root}\n"
                      f"  test_scale: [64, 32]\n")
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    eight = edgeseg.save_checkpoint(tmp_path / "eight.pth", edgeseg.create_model("topformer-tiny", num_classes=8))
    assert main(["predict", str(eight), str(tmp_path / "a.png"), "--config", str(recipe), "--out",
                 str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == (f"edgeseg predict: error: {recipe} is a recipe for 3 classes but the "
                                               f"model predicts 8: pass the config of the model's dataset")
    three = edgeseg.save_checkpoint(tmp_path / "three.pth", edgeseg.create_model("topformer-tiny", num_classes=3))
    assert main(["predict", str(three), str(tmp_path / "a.png"), "--config", str(recipe), "--out",
                 str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "a.png") as labels:  # coloured with the dataset's own palette
        assert labels.getpalette()[:9] == [0, 0, 200, 0, 90, 160, 220, 200, 150]
    (root / "dataset.yaml").write_text("classes: [sky, sea, sand]\npalette: [1, 2, 3]\n")  # read as training reads it
    assert main(["predict", str(three), str(tmp_path / "a.png"), "--config", str(recipe), "--out",
                 str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"edgeseg predict: error: {root / 'dataset.yaml'}: palette colours are [r, g, b] with values 0..255, got 1"]


def test_an_animated_image_is_read_by_its_first_frame_and_said_so(tmp_path, capsys):
    frames = [Image.new("RGB", (40, 30), (60 * i, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert main(["predict", "topformer-tiny", str(tmp_path / "anim.gif"), "--out", str(tmp_path / "out"),
                 "--scale", "64", "32"]) == 0
    assert f"edgeseg predict: warning: image {tmp_path / 'anim.gif'} has 3 frames: the first is read" in \
        capsys.readouterr().err
    assert (tmp_path / "out" / "anim.png").is_file()
