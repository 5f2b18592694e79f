"""`edgeseg train` / `edgeseg eval` end to end on tiny scenes, and the demo's artefacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from edgeseg.cli import main
from edgeseg.config import load_config
from edgeseg.data.classes import SCENES_PALETTE
from edgeseg.engine.demo import demo_config, iters_for_budget, run_demo

REPO = Path(__file__).resolve().parents[2]

TINY = """\
model: {name: topformer-tiny}
data:
  dataset: scenes
  crop_size: [64, 64]
  scale: [128, 64]
  test_scale: [128, 64]
  batch_size: 2
  workers: 0
  train_kwargs: {num_images: 8, size: [64, 64]}
  val_kwargs: {num_images: 2, size: [64, 64]}
schedule: {iters: 2, warmup_iters: 1}
train: {log_interval: 1, eval_interval: 0, checkpoint_interval: 0}
"""


def test_train_then_eval_cli(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    work = tmp_path / "work"
    assert main(["train", str(cfg), "--work-dir", str(work), "--no-progress", "--set", "optim.lr=1e-3"]) == 0
    assert load_config(work / "config.yaml").optim.lr == 1e-3
    capsys.readouterr()
    assert main(["eval", str(cfg), "--checkpoint", str(work / "latest.pth"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"model", "checkpoint", "mIoU", "mAcc", "aAcc", "per_class", "num_images"}
    assert out["model"] == "topformer-tiny" and out["checkpoint"] == str(work / "latest.pth") and out["num_images"] == 2
    assert set(out["per_class"]["disc"]) == {"IoU", "Acc"}
    assert main(["eval", str(cfg), "--checkpoint", str(work / "latest.pth"), "--json", "--fuse", "--out",
                 str(tmp_path / "preds"), "--device", "cpu"]) == 0
    fused = json.loads(capsys.readouterr().out)  # the inference form: the same logits to ~1e-5, the same metrics
    assert abs(fused["mIoU"] - out["mIoU"]) < 0.01 and fused["num_images"] == 2  # a few pixels at most
    written = sorted((tmp_path / "preds").glob("*.png"))  # --out: every prediction as a palette PNG
    assert len(written) == 2 and Image.open(written[0]).mode == "P" and Image.open(written[0]).size == (64, 64)
    assert Image.open(written[0]).getpalette()[:3] == list(SCENES_PALETTE[0])
    assert main(["eval", str(cfg), "--checkpoint", str(work / "latest.pth"), "--tta", "--set",
                 "eval.tta_ratios=[1.0]"]) == 0
    table = capsys.readouterr().out
    assert "mIoU" in table and "stripes" in table
    # user errors: one line on stderr, exit code 2
    assert main(["train", str(cfg), "--set", "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert main(["eval", str(cfg), "--checkpoint", str(tmp_path / "none.pth")]) == 2
    capsys.readouterr()
    # one 64×64 image per step leaves TopFormer's extractor a 1×1 token grid: BatchNorm's error, with the fix
    assert main(["train", str(cfg), "--work-dir", str(tmp_path / "one"), "--no-progress",
                 "--set", "data.batch_size=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(cfg) in err and "raise data.batch_size or data.crop_size" in err


def test_demo_config_matches_yaml():
    assert load_config(REPO / "configs" / "demo_scenes.yaml") == demo_config()


def test_demo_writes_report(tmp_path):
    small = ["data.train_kwargs={num_images: 8, size: [64, 64]}", "data.val_kwargs={num_images: 2, size: [64, 64]}",
             "data.crop_size=[64, 64]", "data.batch_size=2", "data.workers=0"]
    (tmp_path / "log.jsonl").write_text('{"mode": "val", "iter": 30, "mIoU": 9.0}\n')  # a longer demo before
    report = run_demo(tmp_path, iters=4, progress=False, log=lambda *a: None, overrides=small)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == report and report["iterations"] == 4 and 0 <= report["mIoU"] <= 100
    assert report["params"] > 1_000_000 and report["gmacs"] > 0 and report["latency_ms_median"] > 0
    assert f"mIoU {report['mIoU']:.2f}" in (tmp_path / "report.md").read_text()
    assert Image.open(tmp_path / "curves.png").size == (840, 300)
    overlays = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(overlays) == 2 and Image.open(overlays[0]).width == 3 * 64
    val_rows = [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines() if '"val"' in r]
    assert [r["iter"] for r in val_rows] == [1, 2, 3, 4]  # four evaluations make the mIoU curve, this run's only


def test_demo_minutes_pick_iterations_for_the_budget():
    # 1 minute at 0.1 s per bare step, each real iteration ~1.4 steps: 60 / 0.14 = 428.6 -> 420 (multiples of 10)
    assert iters_for_budget(1, 0.1) == 420
    assert iters_for_budget(10, 0.1) == 4280
    assert iters_for_budget(0.01, 0.1) == 50 and iters_for_budget(600, 0.1) == 5000  # clamped to [50, 5000]


def test_predict_slides_the_recipes_windows_as_eval_does(tmp_path, capsys):
    import torch

    from edgeseg.data import write_scenes

    root = write_scenes(tmp_path / "scenes", 8, 2, size=(96, 128), img_suffix=".png")
    cfg = tmp_path / "slide.yaml"  # 96×128 test images, 64×64 windows every 48 pixels: 2 × 3 windows
    cfg.write_text(f"""\
model: {{name: topformer-tiny}}
data: {{dataset: folder, root: {root}, crop_size: [64, 64], scale: [128, 96], test_scale: [128, 96], batch_size: 2,
       workers: 0}}
schedule: {{iters: 2, warmup_iters: 1}}
train: {{log_interval: 1, eval_interval: 0, checkpoint_interval: 0}}
eval: {{mode: slide, crop_size: [64, 64], stride: [48, 48]}}
""")
    work = tmp_path / "work"
    assert main(["train", str(cfg), "--work-dir", str(work), "--no-progress"]) == 0
    assert main(["eval", str(cfg), "--checkpoint", str(work / "latest.pth"), "--out", str(tmp_path / "eval")]) == 0
    images = sorted((root / "img_dir" / "val").iterdir())

    def labels(folder: Path) -> list:
        return [Image.open(folder / f"{image.stem}.png").tobytes() for image in images]

    expected = labels(tmp_path / "eval")
    # the checkpoint carries the recipe's window: predict slides it with no flags
    assert main(["predict", str(work / "latest.pth"), *map(str, images), "--out", str(tmp_path / "pred")]) == 0
    assert labels(tmp_path / "pred") == expected
    # weights alone (as official releases are): the recipe comes with --config, and without it a warning
    bare = tmp_path / "bare.pth"
    torch.save({"state_dict": torch.load(work / "latest.pth", weights_only=True)["state_dict"]}, bare)
    capsys.readouterr()
    assert main(["predict", str(bare), *map(str, images), "--out", str(tmp_path / "bare")]) == 0
    assert "carries no test pipeline" in capsys.readouterr().err
    assert main(["predict", str(bare), *map(str, images), "--out", str(tmp_path / "recipe"), "--config",
                 str(cfg)]) == 0
    assert "warning" not in capsys.readouterr().err and labels(tmp_path / "recipe") == expected
    assert main(["predict", str(bare), str(images[0]), "--out", str(tmp_path / "x"), "--mode", "slide"]) == 2
    assert "--mode slide" in capsys.readouterr().err and not (tmp_path / "x").exists()
    other = tmp_path / "other.yaml"  # another architecture's recipe: its windows and scale are not this model's
    other.write_text(cfg.read_text().replace("name: topformer-tiny", "name: segformer-b0"))
    assert main(["predict", str(bare), str(images[0]), "--out", str(tmp_path / "x"), "--config", str(other)]) == 2
    assert "is a recipe for segformer-b0 but the model is topformer-tiny" in capsys.readouterr().err


def test_export_of_a_slide_recipes_model_takes_its_window_as_input_size(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from edgeseg import create_model, save_checkpoint
    from edgeseg.checkpoint import set_test_windows

    model = set_test_windows(create_model("topformer-tiny", num_classes=4), (64, 128), (48, 96))
    ckpt = save_checkpoint(tmp_path / "slide.pth", model)
    assert main(["export", str(ckpt), str(tmp_path / "slide.onnx")]) == 0
    assert "1x3x64x128 -> 1x4x8x16" in capsys.readouterr().out
    with pytest.raises(ValueError, match="each stride at most its crop"):
        set_test_windows(model, (64, 64), (0, 64))
