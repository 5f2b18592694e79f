"""The command line: machine-readable output and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeseg import create_model, save_checkpoint
from edgeseg.cli import main


def test_info_json_has_the_documented_fields(capsys):
    assert main(["info", "topformer-tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "topformer-tiny" and out["input_size"] == [512, 512] and out["num_classes"] == 150
    assert out["params"] == 1_389_654
    assert round(out["gmacs"], 1) == 0.6
    assert out["paper"]["params_m"] == pytest.approx(1.4, abs=0.05) and out["paper"]["gmacs"] == 0.6
    assert "2 FLOPs" in out["mac_convention"]


def test_info_size_and_classes(capsys):
    assert main(["info", "topformer-tiny", "--size", "448", "448", "--num-classes", "19", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["input_size"] == [448, 448] and out["num_classes"] == 19
    # The count scales with the input area: (448/512)² of the 512² count, up to the attention's N² terms (~0.1 %)
    assert main(["info", "topformer-tiny", "--num-classes", "19", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    for key in ("gmacs", "gmacs_macs_only"):
        assert out[key] == pytest.approx(full[key] * (448 / 512) ** 2, rel=5e-3), key


def test_info_sparsity_compares_only_figures_published_for_it(capsys):
    """A dynamic model's row compares with a paper figure only where one exists for that sparsity."""
    assert main(["info", "dynasegformer-b0", "--sparsity", "0.3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["paper"]["gmacs"] == 3.3
    assert main(["info", "dynasegformer-b0", "--sparsity", "0.4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["paper"]["gmacs"] is None  # nothing published at 40 %
    assert main(["info", "dynasegformer-b2", "--json"]) == 0  # B2's figure comes at a sparsity nobody states
    assert json.loads(capsys.readouterr().out)["paper"] is None
    assert main(["info", "topformer-tiny", "--sparsity", "0.3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # a dynamic extractor: TopFormer's figures are the dense model's
    assert out["paper"] is None and out["params"] > 1_389_654 and out["gmacs"] < 0.58
    assert main(["info", "dynasegformer-b0", "--json"]) == 0  # the builder's default sparsity, said as counted
    assert json.loads(capsys.readouterr().out)["sparsity"] == 0.3
    assert main(["info", "topformer-tiny", "--sparsity", "0.5"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("topformer-tiny @50% ")  # the table says it too
    assert main(["info", "segformer-b0", "--sparsity", "0.3"]) == 2  # a dense-only family: the flag is named
    assert capsys.readouterr().err.strip() == ("edgeseg info: error: --sparsity prunes dynamic models "
                                               "(dynasegformer-*, topformer-*), not segformer-b0")


def test_info_table_compares_paper_figures_at_their_own_input_size(capsys):
    assert main(["info", "topformer-tiny", "--size", "448", "448"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:2] == ["topformer-tiny", "448x448"] and row[-1] == "-"  # the 512² figure is not this size's
    assert main(["info", "topformer-tiny"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "0.6"


def test_info_compares_paper_figures_only_for_their_class_count(capsys, tmp_path):
    """The published figures are for ADE20K's 150 classes (ImageNet's 1000): another classifier is another model."""
    assert main(["info", "segformer-b0", "--num-classes", "19", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["paper"] is None
    path = save_checkpoint(tmp_path / "city.pth", create_model("topformer-tiny", num_classes=19))
    assert main(["info", str(path)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[2] == "19" and row[4] == "-" and row[-1] == "-"


def test_info_counts_a_model_without_figures_at_its_recipes_size(capsys):
    assert main(["info", "dynasegformer-b5", "--json"]) == 0  # SegFormer-B5's ADE20K crop, as its dense model
    assert json.loads(capsys.readouterr().out)["input_size"] == [640, 640]
    assert main(["info", "mit-b0", "--json"]) == 0  # an ImageNet encoder
    assert json.loads(capsys.readouterr().out)["input_size"] == [224, 224]


@pytest.mark.parametrize("leave, bar_ends_with", [(True, "it/s]"), (False, "\r")])
def test_an_error_during_a_progress_bar_is_a_line_of_its_own(capsys, monkeypatch, leave, bar_ends_with):
    """A training bar stays (leave=True), an evaluation's erases itself when closed: either way, in a log file, the
    error starts a line of its own."""
    import edgeseg.cli
    from tqdm import tqdm

    def failing(args):  # as a run whose data fails halfway
        bar = tqdm(total=4, desc="train", leave=leave, mininterval=0)
        bar.update(2)
        raise ValueError("data/x.png could not be read")

    monkeypatch.setattr(edgeseg.cli, "cmd_info", failing)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    before, _, last = err.rpartition("\n" + "edgeseg info: error: data/x.png could not be read\n")
    # the bar's last state (padded with spaces to the longest it printed), then the error on a line of its own
    assert last == "" and before.rstrip(" ").endswith(bar_ends_with) and "2/4" in before


def test_a_reader_that_goes_away_stops_the_output_quietly():
    """``edgeseg info | head -1``: the pipe closes before edgeseg writes; no error message, exit 1."""
    proc = subprocess.Popen([sys.executable, "-m", "edgeseg", "info", "topformer-tiny"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err == ""


def test_info_reads_the_architecture_of_a_checkpoint(tmp_path, capsys):
    path = save_checkpoint(tmp_path / "m.pth", create_model("dynasegformer-b0", num_classes=3, sparsity=0.5))
    assert main(["info", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "dynasegformer-b0" and out["num_classes"] == 3 and out["sparsity"] == 0.5
    assert main(["info", "dynasegformer-b0", "--num-classes", "3", "--sparsity", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gmacs"] == out["gmacs"]
    assert main(["info", str(tmp_path / "missing.pth")]) == 2 and "missing.pth" in capsys.readouterr().err


def test_info_builder_arguments_change_the_architecture_and_drop_the_paper(capsys):
    """``--arg KEY=VALUE`` reaches the builder (values read as YAML); a changed architecture has no paper figure."""
    assert main(["info", "topformer-tiny", "--json"]) == 0
    depthwise = json.loads(capsys.readouterr().out)
    assert main(["info", "topformer-tiny", "--arg", "head_depthwise=false", "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)  # TopFormer-Tiny's Cityscapes head: a dense 1×1 fuse conv
    assert dense["params"] > depthwise["params"] and dense["gmacs"] > depthwise["gmacs"]
    assert dense["paper"] is None and depthwise["paper"] is not None
    assert main(["info", "segformer-b0", "--arg", "decoder=mmseg", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] > 3_752_694  # per-stage BN: more than the official decoder


def test_info_of_a_checkpoint_trained_with_regularisation_keeps_the_paper(tmp_path, capsys):
    """drop_path_rate and dropout build the same architecture: a checkpoint that records them still compares with
    the published figures."""
    path = save_checkpoint(tmp_path / "m.pth", create_model("segformer-b0", drop_path_rate=0.2, dropout=0.0))
    assert main(["info", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["paper"] is not None and out["paper"]["gmacs"] == 8.4


@pytest.mark.parametrize("arg, message", [("decoder", "expected KEY=VALUE"), ("nonsense=1", "unknown SegFormer")])
def test_bad_builder_argument_is_one_line(capsys, arg, message):
    assert main(["info", "segformer-b0", "--arg", arg]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_info_table_lists_every_model(capsys, monkeypatch):
    import edgeseg.models

    # Building all ~25 models (B5 has 85 M parameters) takes minutes here: the table logic is the same for three.
    names = ["topformer-tiny", "topformer-tiny-cls", "segformer-b0"]
    monkeypatch.setattr(edgeseg.models, "list_models", lambda: names)
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == names
    assert "1,389,654" in lines[1]


def test_bench_json(capsys):
    assert main(["bench", "topformer-tiny", "--size", "64", "64", "--seconds", "0.1", "--fuse", "--threads", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("model", "input_size", "batch", "threads", "fused", "latency_ms_median", "latency_ms_p90", "gmacs"):
        assert key in out
    assert out["fused"] is True and out["threads"] == 1 and out["latency_ms_p90"] >= out["latency_ms_median"] > 0


def test_bench_fused_dynamic_model_says_which_planner_ran(capsys, monkeypatch):
    from edgeseg.models import native

    args = ["bench", "dynasegformer-b0", "--sparsity", "0.3", "--size", "64", "64", "--seconds", "0.1",
            "--threads", "1"]
    if native.available():
        assert main([*args, "--fuse", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["extra"] == {"sparsity": 0.3, "dgl_plans": "native"} and out["fused"] is True
    monkeypatch.setattr(native, "library", lambda: None)  # no kernels: every site plans in PyTorch
    assert main([*args, "--fuse", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["extra"] == {"sparsity": 0.3, "dgl_plans": "pytorch"}
    assert main(args) == 0  # eager: the gathered path without folded gates plans in PyTorch, nothing to report
    assert "DGL plans" not in capsys.readouterr().out


def test_unknown_model_is_one_line(capsys):
    assert main(["info", "topformer-tinyy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "topformer-tiny" in err


def test_convert_official_to_edgeseg(reference_dir, tmp_path, capsys):
    src = reference_dir / "topformer-tiny_ade20k-150_1x3x512x512_seed0" / "checkpoint.pth"
    assert main(["convert", str(src), str(tmp_path / "t.pth")]) == 0
    import edgeseg

    model = edgeseg.load_model(tmp_path / "t.pth")
    assert model.model_name == "topformer-tiny"
    official = edgeseg.load_model(src).state_dict()  # the same tensors, BN statistics included
    converted = model.state_dict()
    assert converted.keys() == official.keys() and all(torch.equal(converted[k], official[k]) for k in official)


def test_python_dash_m_works():
    res = subprocess.run([sys.executable, "-m", "edgeseg", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "info" in res.stdout


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    """Each mistake exits 2 with one line naming what is wrong and the fix, and changes no file."""
    from PIL import Image

    ckpt = save_checkpoint(tmp_path / "tt8.pth", create_model("topformer-tiny", num_classes=8))
    b0 = save_checkpoint(tmp_path / "b0.pth", create_model("segformer-b0", num_classes=8))
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (32, 32), (90, 120, 30)).save(tmp_path / "photos" / "photo.png")
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["info", str(tmp_path / "empty.pth")], "is empty (0 bytes)"),
        (["info", str(tmp_path / "text.pth")], "is not a PyTorch checkpoint"),
        (["bench", str(ckpt), "--num-classes", "19"], "has 8 classes, not 19: leave the class count out"),
        (["info", str(ckpt), "--sparsity", "0.3"], "holds topformer-tiny, a dense model: a sparsity needs a"),
        (["bench", str(b0), "--sparsity", "0.3"], "holds segformer-b0, a dense model: a sparsity needs a dynamic"),
        (["export", str(ckpt), str(tmp_path / "x.txt")], "an ONNX graph is written to a .onnx file"),
        (["predict", str(ckpt), str(tmp_path / "photos"), "--out", str(tmp_path / "photos")], "is an input"),
        (["predict", str(ckpt), str(tmp_path / "photos"), "--out", str(tmp_path / "a_file")], "choose another path"),
        (["info", "topformer-tiny", "--arg", "head_channels=[1,"], "is not a YAML value"),
        (["predict", str(ckpt), str(tmp_path / "photos"), "--device", "mps"], "runs on cpu or cuda"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert (tmp_path / "photos" / "photo.png").stat().st_size > 0 and (tmp_path / "a_file").read_text() == "x"
    Image.open(tmp_path / "photos" / "photo.png").verify()  # still the photo, not a label map
    assert Image.open(tmp_path / "photos" / "photo.png").mode == "RGB"


@pytest.mark.parametrize("argv", [["info", "dynasegformer-b0", "--sparsity", "1.5"],
                                  ["bench", "dynasegformer-b0", "--sparsity", "-0.1"]])
def test_a_sparsity_outside_0_1_is_refused_before_anything_runs(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "is the fraction of gated neurons pruned, in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["export", "topformer-tiny", "x.onnx", "--batch", "0"],
                                  ["bench", "topformer-tiny", "--threads", "0"],
                                  ["info", "topformer-tiny", "--size", "-64", "64"],
                                  ["demo", "--iters", "0"]])
def test_zero_or_negative_counts_are_refused_before_anything_runs(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "must be positive" in capsys.readouterr().err


def test_demo_takes_an_iteration_count_or_a_time_budget_not_both(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--iters", "3", "--minutes", "1"])
    assert exit_.value.code == 2 and "argument --minutes: not allowed with argument --iters" in capsys.readouterr().err


@pytest.mark.parametrize("arg, message", [("head_depthwise=maybe", "head_depthwise='maybe': expected bool"),
                                          ("head_channels=abc", "head_channels='abc': expected int")])
def test_builder_arguments_of_the_wrong_type_are_refused(capsys, arg, message):
    assert main(["info", "topformer-tiny", "--arg", arg]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_conversions_and_evaluations_never_overwrite_their_sources(tmp_path, capsys):
    from edgeseg.data import write_scenes

    ckpt = save_checkpoint(tmp_path / "tt8.pth", create_model("topformer-tiny", num_classes=8))
    for argv, message in [(["convert", str(ckpt), str(ckpt)], "would overwrite"),
                          (["convert", str(ckpt), str(tmp_path / "tt8.safetensors")], "is a .pth file")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    root = write_scenes(tmp_path / "scenes", 1, 2, size=(64, 64))
    labels = sorted((root / "ann_dir" / "val").iterdir())
    before = [p.read_bytes() for p in labels]
    (tmp_path / "cfg.yaml").write_text(f"data:\n  dataset: folder\n  root: {root}\n  test_scale: [64, 64]\n"
                                       f"  workers: 0\n")
    assert main(["eval", str(tmp_path / "cfg.yaml"), "--checkpoint", str(ckpt), "--out",
                 str(root / "ann_dir" / "val")]) == 2
    assert "is a file of the evaluated dataset" in capsys.readouterr().err
    assert [p.read_bytes() for p in labels] == before


def test_an_imagenet_classifier_exports(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert main(["export", "mit-b0", str(tmp_path / "mit.onnx"), "--size", "64", "64", "--num-classes", "10"]) == 0
    assert "-> 1x10" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["mit-b0", "topformer-tiny-cls"])
def test_predict_and_eval_refuse_an_imagenet_backbone_in_one_line(tmp_path, capsys, name):
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    ckpt = save_checkpoint(tmp_path / "backbone.pth", create_model(name))
    recipe = Path(__file__).parents[1] / "configs" / "demo_scenes.yaml"
    for argv in (["predict", str(ckpt), str(tmp_path / "a.png"), "--out", str(tmp_path / "out")],
                 ["eval", str(recipe), "--checkpoint", str(ckpt)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"edgeseg {argv[0]}: error: '{ckpt}' holds {name}, an ImageNet backbone without a segmentation "
                       f"head: pass a segmentation checkpoint (a backbone starts training: model.pretrained in a "
                       f"recipe)"]


def test_predict_with_a_model_name_warns_of_untrained_weights(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    assert main(["predict", "topformer-tiny", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"),
                 "--scale", "64", "32"]) == 0
    assert "'topformer-tiny' is a model name, not a checkpoint: its weights are untrained" in capsys.readouterr().err


def test_eval_mode_slide_without_a_window_names_the_flag_and_the_keys(capsys):
    recipe = Path(__file__).parents[1] / "configs" / "demo_scenes.yaml"
    assert main(["eval", str(recipe), "--checkpoint", "unused.pth", "--mode", "slide"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--mode slide with {recipe}: eval.mode 'slide' needs eval.crop_size and " \
        "eval.stride" in err and "--set eval.crop_size=" in err


def test_a_checkpoint_is_any_file_and_other_files_get_their_own_one_line_answer(tmp_path, capsys):
    from PIL import Image

    ckpt = save_checkpoint(tmp_path / "tt8.pth", create_model("topformer-tiny", num_classes=8))
    for renamed in ("best.ckpt", "iter_1000"):  # renamed files are still checkpoints, not model names
        (tmp_path / renamed).write_bytes(ckpt.read_bytes())
        assert main(["info", str(tmp_path / renamed), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["num_classes"] == 8
    (tmp_path / "cut.pth").write_bytes(ckpt.read_bytes()[:10_000])  # an interrupted download
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    (tmp_path / "r.yaml").write_text("model: {name: topformer-tiny}\n")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    cases = [(["info", str(tmp_path / "cut.pth")], f"checkpoint '{tmp_path / 'cut.pth'}' is damaged or truncated"),
             (["predict", str(tmp_path / "m.onnx"), str(tmp_path / "a.png")], "is an ONNX graph"),
             (["bench", str(tmp_path / "r.yaml")], "is a recipe, not weights"),
             (["export", "nvidia/segformer-b0-finetuned-ade-512-512", str(tmp_path / "x.onnx")],
              "edgeseg downloads nothing"),
             (["convert", str(ckpt), str(tmp_path / "hf.safetensors"), "--to", "hf"], "--to hf writes a folder")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "warning" not in err, (argv, err)
    assert not (tmp_path / "hf.safetensors").exists()


def test_overrides_come_several_per_flag_and_under_mmsegs_name():
    from edgeseg.cli import build_parser

    args = build_parser().parse_args(["train", "--set", "a=1", "r.yaml", "--cfg-options", "b=2", "c=3", "--set", "d=4"])
    assert args.config == "r.yaml" and args.set == ["a=1", "b=2", "c=3", "d=4"]


def test_version(capsys):
    import edgeseg

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"edgeseg {edgeseg.__version__}"
    assert "Segmenter" in dir(edgeseg)


def test_eval_names_the_model_it_scored_and_warns_when_the_recipe_builds_another(tmp_path, capsys):
    from edgeseg.data import write_scenes

    root = write_scenes(tmp_path / "scenes", 1, 1, size=(64, 64))
    (tmp_path / "cfg.yaml").write_text(f"model: {{name: topformer-tiny}}\ndata:\n  dataset: folder\n  root: {root}\n"
                                       f"  test_scale: [64, 64]\n  workers: 0\n")
    ckpt = save_checkpoint(tmp_path / "b0.pth", create_model("segformer-b0", num_classes=8))
    assert main(["eval", str(tmp_path / "cfg.yaml"), "--checkpoint", str(ckpt)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"segformer-b0 ({ckpt}) on folder val, whole:\n") and "mIoU" in out
    assert f"'{ckpt}' holds segformer-b0 but {tmp_path / 'cfg.yaml'} builds topformer-tiny" in err
    assert main(["eval", str(tmp_path / "cfg.yaml"), "--checkpoint", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "segformer-b0"
    five = save_checkpoint(tmp_path / "b0_5.pth", create_model("segformer-b0", num_classes=5))
    assert main(["eval", str(tmp_path / "cfg.yaml"), "--checkpoint", str(five)]) == 2
    assert f"checkpoint '{five}' predicts 5 classes but {root / 'dataset.yaml'} lists 8 classes: pass the config " \
        "of the checkpoint's dataset" in capsys.readouterr().err
    with open(root / "dataset.yaml", "a") as f:
        f.write("note: made by write_scenes\n")
    assert main(["eval", str(tmp_path / "cfg.yaml"), "--checkpoint", str(ckpt), "--json"]) == 0
    err = capsys.readouterr().err  # edgeseg's warnings are one line, as its errors, without a code excerpt
    assert f"edgeseg eval: warning: {root / 'dataset.yaml'}: unknown key 'note' ignored" in err
    assert all(line.startswith("edgeseg eval: warning: ") for line in err.splitlines())


@pytest.mark.parametrize("command", ["train", "distill"])
def test_a_recipe_error_under_torchrun_is_said_once(tmp_path, capsys, monkeypatch, command):
    """Every torchrun process reads the same recipe: rank 0 says a mistake in it, the others exit with the same code
    in silence. An error that may differ per process (here a missing recipe file, which one node may lack; then a
    missing data root, found after the recipe is read) is said by each."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: segformer-b0}\nschedul: {iters: 10}\n")  # a typo'd section
    said = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main([command, str(recipe), "--work-dir", str(tmp_path / "w")]) == 2
        said[rank] = capsys.readouterr().err
    assert said["0"].count("\n") == 1 and "schedul" in said["0"] and said["1"] == ""
    assert main([command, str(tmp_path / "missing.yaml"), "--work-dir", str(tmp_path / "w")]) == 2  # still rank 1
    assert "missing.yaml" in capsys.readouterr().err
    recipe.write_text("model: {name: dynasegformer-b0}\ndistill: {sparsity: 0.3, teacher: t.pth}\n"
                      if command == "distill" else "model: {name: segformer-b0}\n")
    assert main([command, str(recipe), "--work-dir", str(tmp_path / "w")]) == 2  # still rank 1
    assert "a data root is required" in capsys.readouterr().err
