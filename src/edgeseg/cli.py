"""``edgeseg`` command line: each subcommand parses its flags and calls the public API in a few lines."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _model_arguments(p: argparse.ArgumentParser, builder: bool = True) -> None:
    """The flags that shape the model a command builds or loads (read back by :func:`_model_kwargs`): its class
    count and, where a command builds models by name, the sparsity and any builder argument."""
    p.add_argument("--num-classes", type=POSITIVE_INT, help="classes of the model built (a checkpoint must match)")
    if builder:
        p.add_argument("--sparsity", type=_sparsity, help="dynamic models: fraction of gated neurons pruned")
        p.add_argument("--arg", action="append", metavar="KEY=VALUE", help=ARG_HELP)


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Builder keyword arguments from ``--arg KEY=VALUE`` (values read as YAML), ``--num-classes``, ``--sparsity``."""
    import yaml

    kwargs: dict[str, Any] = {}
    for item in getattr(args, "arg", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--arg {item!r}: expected KEY=VALUE, e.g. --arg head_depthwise=false")
        try:
            kwargs[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"--arg {item!r}: {value!r} is not a YAML value ({type(err).__name__}); quote "
                             f"strings, e.g. --arg decoder=mmseg, lists as [1, 2]") from err
    if getattr(args, "num_classes", None) is not None:
        kwargs["num_classes"] = args.num_classes
    if getattr(args, "sparsity", None) is not None:
        name = getattr(args, "model", None)
        if name and not _is_checkpoint(name) and not (name.startswith("dynasegformer-") or (
                name.startswith("topformer-") and not name.endswith("-cls"))):
            raise ValueError(f"--sparsity prunes dynamic models (dynasegformer-*, topformer-*), not {name}")
        kwargs["sparsity"] = args.sparsity
    return kwargs


def _sparsity(text: str) -> float:
    """``--sparsity``: a fraction of neurons pruned, refused outside [0, 1) before any model is built."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"is the fraction of gated neurons pruned, in [0, 1); got {text}")
    return value


_sparsity.__name__ = "fraction"  # argparse names the expected type by it ("invalid fraction value")


def _positive(kind: type) -> Any:
    """An argparse ``type`` that reads ``kind`` (int or float) and refuses zero and negative values: a batch, size,
    thread count or duration of 0 has no meaning, and would fail deep inside instead of here."""
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the expected type by it ("invalid int value")
    return parse


POSITIVE_INT, POSITIVE_FLOAT = _positive(int), _positive(float)


WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def _is_checkpoint(arg: str) -> bool:
    """Whether a MODEL argument names weights rather than an architecture: any file or folder that exists (a
    checkpoint renamed ``best.ckpt`` or ``iter_1000`` is still one), or a weights suffix (then the loader says it is
    missing). Files that hold something else, and hub ids, which nothing here downloads, are refused in one line."""
    path = Path(arg)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        raise ValueError(f"'{arg}' is an ONNX graph, which edgeseg does not load back: run it with onnxruntime (its "
                         f"metadata holds the normalisation and labels), or pass the checkpoint it was exported from")
    if suffix in (".yaml", ".yml", ".py"):
        raise ValueError(f"'{arg}' is a recipe, not weights: pass a checkpoint (.pth) or a Hugging Face folder "
                         f"(train and eval take recipes; predict takes one as --config)")
    if path.exists() or suffix in WEIGHT_SUFFIXES:
        return True
    if "/" in arg or os.sep in arg:
        raise ValueError(f"'{arg}' is neither a file nor a folder here, and edgeseg downloads nothing: check the "
                         f"path, or for a Hugging Face hub id fetch the folder first (huggingface-cli download "
                         f"{arg} --local-dir DIR) and pass DIR")
    return False


def _device(name: str):
    """``--device``: ``auto`` is the GPU where there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: not a device (e.g. cpu, cuda, cuda:1)") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: edgeseg runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def _build(args: argparse.Namespace):
    from .checkpoint import load_model
    from .models import create_model

    kwargs = _model_kwargs(args)
    try:
        return (load_model if _is_checkpoint(args.model) else create_model)(args.model, **kwargs)
    except TypeError as err:  # a builder argument of the wrong name or type (--arg, --num-classes, --sparsity)
        given = f"check the --arg values ({', '.join(kwargs)})" if kwargs else \
            "the model_args the file names do not fit the builder"
        raise ValueError(f"{args.model}: {err}; {given}") from err


def _segmentation_model(model: Any, source: str) -> Any:
    """``model``, refused with a one-line fix when it is an ImageNet backbone or classifier (``mit-bX``,
    ``*-cls``), which has no segmentation head to predict or score with."""
    from .models import is_classifier

    name = getattr(model, "model_name", "")
    if is_classifier(name):
        raise ValueError(f"'{source}' holds {name}, an ImageNet backbone without a segmentation head: pass a "
                         f"segmentation checkpoint (a backbone starts training: model.pretrained in a recipe)")
    return model


DEVICE_HELP = "where the model runs: auto (the GPU where there is one, else the CPU), cpu, cuda, cuda:N"
ARG_HELP = "builder argument, repeatable (value read as YAML), e.g. --arg head_depthwise=false or --arg decoder=mmseg"


# ----------------------------------------------------------------------------------------------------------- info
def _info_row(name: str, size: tuple[int, int], kwargs: dict[str, Any]) -> dict[str, Any]:
    import torch

    from .deploy.benchmark import count_gmacs, count_params
    from .models import PAPER, REGULARISATION_ARGS, create_model

    try:  # shapes are all a count needs: building on the meta device skips initialising 85 M parameters
        with torch.device("meta"):
            model = create_model(name, **kwargs).eval()
        gmacs = (count_gmacs(model, size), count_gmacs(model, size, convention="macs"))
    except (RuntimeError, NotImplementedError):  # a builder or forward that needs real tensors
        model = create_model(name, **kwargs).eval()
        gmacs = (count_gmacs(model, size), count_gmacs(model, size, convention="macs"))
    sparsity = model.model_args.get("sparsity")  # as built: a DynaSegFormer's default too
    paper = PAPER.get(name)
    if set(kwargs) - {"num_classes", "sparsity"} - REGULARISATION_ARGS or (
            paper and paper["num_classes"] != model.num_classes):
        paper = None  # a changed architecture or classifier: the published figures are not its own
    if "sparsity" in kwargs and paper is not None and "gmacs_at_sparsity" not in paper:
        paper = None  # published figures of the dense model (e.g. a TopFormer with a dynamic extractor)
    paper_out = None
    if paper is not None:
        paper_out = {"params_m": paper.get("params_m"), "gmacs": paper.get("gmacs"),
                     "input_size": paper.get("input_size")}
        if sparsity is not None:  # only a figure published for this sparsity compares
            paper_out["gmacs"] = paper.get("gmacs_at_sparsity", {}).get(str(sparsity))
    return {"model": name, "input_size": list(size), "num_classes": model.num_classes,
            "params": count_params(model), "gmacs": round(gmacs[0], 4), "gmacs_macs_only": round(gmacs[1], 4),
            "sparsity": sparsity, "paper": paper_out}


def cmd_info(args: argparse.Namespace) -> int:
    from .deploy.benchmark import MAC_CONVENTION
    from .models import INPUT_SIZES, list_models

    size = tuple(args.size) if args.size else None
    kwargs = _model_kwargs(args)
    if args.model and _is_checkpoint(args.model):  # the architecture the file holds
        model = _build(args)
        names, kwargs = [model.model_name], {**model.model_args, **kwargs}
    else:
        names = [args.model] if args.model else list_models()
    rows = []
    for name in names:
        rows.append(_info_row(name, size or INPUT_SIZES.get(name, (512, 512)), kwargs))
    if args.json:
        out = rows[0] if args.model else rows
        if args.model:
            out = {**out, "mac_convention": MAC_CONVENTION}
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'model':<22} {'input':>9} {'classes':>7} {'params':>12} {'paper M':>8} {'GMACs':>8} {'paper':>7}")
    for r in rows:
        p = r["paper"] or {}
        pm = f"{p['params_m']:.2f}" if p.get("params_m") is not None else "-"
        same_size = p.get("input_size") in (None, r["input_size"])  # a figure at another size does not compare
        pg = f"{p['gmacs']:g}" if p.get("gmacs") is not None and same_size else "-"
        size_s = "x".join(map(str, r["input_size"]))
        name = r["model"] if r["sparsity"] is None else f"{r['model']} @{r['sparsity']:.0%}"
        print(f"{name:<22} {size_s:>9} {r['num_classes']:>7} {r['params']:>12,} {pm:>8} {r['gmacs']:>8.3f} {pg:>7}")
    print(f"GMACs: {MAC_CONVENTION}.")
    return 0


# ---------------------------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from .deploy.benchmark import benchmark
    from .models.dynamic import dynamic_gates

    model = _build(args).eval()
    model = model.fuse() if args.fuse else model  # fused here, so its gates can say which planner ran
    res = benchmark(model, tuple(args.size), batch=args.batch, threads=args.threads, min_seconds=args.seconds,
                    name=args.model)
    res.fused = args.fuse
    extra = {} if args.sparsity is None else {"sparsity": args.sparsity}
    gates = list(dynamic_gates(model))
    if args.fuse and gates:  # a native plan is cached on the gate where one ran
        extra["dgl_plans"] = "native" if any(g.native_plans for g in gates) else "pytorch"
    res.extra = extra or None
    if args.json:
        print(json.dumps(res.as_dict(), indent=2))
    else:
        plans = f"  DGL plans {extra['dgl_plans']}" if "dgl_plans" in extra else ""
        print(f"{res.model}  {res.input_size[0]}x{res.input_size[1]}  batch {res.batch}  threads {res.threads}  "
              f"{'fused' if res.fused else 'eager'}{plans}")
        print(f"  latency median {res.latency_ms_median:.2f} ms   p90 {res.latency_ms_p90:.2f} ms   "
              f"{res.images_per_s:.1f} images/s   {res.gmacs:.3f} GMACs/image   ({res.runs} runs)")
    return 0


# -------------------------------------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import load_model, save_checkpoint

    src, dst = Path(args.src).resolve(), Path(args.dst).resolve()
    if args.to == "edgeseg" and (dst == src or src in dst.parents):
        raise ValueError(f"{args.dst} would overwrite {args.src}, the checkpoint being converted: write elsewhere")
    if args.to == "edgeseg" and dst.suffix not in (".pth", ".pt"):
        raise ValueError(f"{args.dst}: an edgeseg checkpoint is a .pth file; for a Hugging Face folder (its weights "
                         f"in model.safetensors) name a folder and add --to hf")
    if args.to == "hf" and dst.suffix in WEIGHT_SUFFIXES:
        raise ValueError(f"{args.dst}: --to hf writes a folder (config.json, model.safetensors): name a folder")
    model = load_model(args.src)
    if args.to == "hf":
        from .models.hf_segformer import save_hf_folder

        out = save_hf_folder(model, args.dst)
    else:
        out = save_checkpoint(args.dst, model)
    print(f"wrote {model.model_name} ({args.to} layout) to {out}")
    return 0


# --------------------------------------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from .deploy.export import export_onnx

    if Path(args.out).suffix.lower() != ".onnx":  # checked before the export, which takes a while
        raise ValueError(f"{args.out}: an ONNX graph is written to a .onnx file: name it e.g. model.onnx")
    model = _build(args)
    opset = args.opset or (18 if args.exporter == "dynamo" else 17)
    size = args.size or getattr(model, "test_crop_size", None) or (512, 512)  # a slide recipe runs its windows
    res = export_onnx(model, args.out, tuple(size), batch=args.batch, opset=opset,
                      fuse=not args.no_fuse, check=not args.no_check, exporter=args.exporter, dynamic=args.dynamic)
    shapes = f"{'x'.join(map(str, res.input_shape))} -> {'x'.join(map(str, res.output_shape))}"
    if res.dynamic:
        shapes = f"batch, height and width free, traced at {shapes}"
    check = "" if res.max_abs_diff is None else (f"; onnxruntime vs PyTorch: max |diff| {res.max_abs_diff:.1e}, "
                                                 f"same class at {res.argmax_agreement:.2%} of positions")
    form = "fused" if res.fused else "eager"
    print(f"wrote {model.model_name} ({form}, {shapes}, opset {res.opset}) to {res.path}{check}")
    return 0


# -------------------------------------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    from PIL import Image

    from .data import save_label_png
    from .deploy.predict import Segmenter, check_outputs, expand_inputs, is_video, prediction_paths, segment_video
    from .fileio import atomic_write

    out = Path(args.out)
    inputs = expand_inputs(args.images, out, recursive=args.recursive)
    check_outputs(inputs)
    if not _is_checkpoint(args.model):  # a name builds a fresh model: fine for bench and export, noise here
        print(f"edgeseg predict: warning: '{args.model}' is a model name, not a checkpoint: its weights are "
              f"untrained (pass a .pth or a Hugging Face folder)", file=sys.stderr)
    model = _segmentation_model(_build(args), args.model)
    if args.config:
        _apply_recipe(model, args.config)
    if args.mode == "slide" and not getattr(model, "test_crop_size", None):
        raise ValueError(f"--mode slide: '{args.model}' carries no sliding window; pass a recipe that has one "
                         f"(--config with eval.crop_size and eval.stride)")
    segmenter = Segmenter(model.to(_device(args.device)), scale=args.scale, size_divisor=args.size_divisor,
                          fuse=not args.no_fuse, mode=args.mode)
    for image, image_out in inputs:
        image_out.mkdir(parents=True, exist_ok=True)
        if is_video(image):
            video, labels_dir, frames = segment_video(segmenter, image, image_out)
            print(f"{image} -> {video} ({frames} frames; label maps in {labels_dir})")
            continue
        labels = segmenter(image)
        label_path, overlay_path = prediction_paths(image, image_out)
        save_label_png(labels, label_path, segmenter.palette)
        overlay = Image.fromarray(segmenter.overlay(image, labels))
        atomic_write(overlay_path, lambda tmp, im=overlay: im.save(tmp, quality=90))
        print(f"{image} -> {label_path}")
    if args.scale is None and not getattr(model, "test_scale", None) and _is_checkpoint(args.model):
        # said once the outputs exist: a failing run prints its one-line error alone
        norm = "" if getattr(model, "input_mean", None) else " with ImageNet's normalisation"
        print(f"edgeseg predict: warning: '{args.model}' carries no test pipeline (official files have none): "
              f"predicted at ADE20K's 2048x512 bound{norm}; pass its recipe (--config, e.g. the configs/ file of its "
              f"model and dataset) or --scale", file=sys.stderr)
    return 0


def _apply_recipe(model: Any, config: str) -> None:
    """``predict --config``: test a model as its recipe's ``eval`` does (mmseg's config + checkpoint habit), for
    files that carry no recipe of their own (official releases, Hugging Face folders)."""
    from .checkpoint import set_labels, set_test_recipe
    from .config import load_config
    from .data import CLASSES, PALETTES

    cfg = load_config(config, [])
    if cfg.model.name != getattr(model, "model_name", cfg.model.name):
        raise ValueError(f"{config} is a recipe for {cfg.model.name} but the model is {model.model_name}: pass the "
                         f"config of the model's architecture and dataset")
    dataset = cfg.data.dataset
    classes, palette = (CLASSES[dataset], PALETTES.get(dataset)) if dataset in CLASSES else _own_classes(cfg)
    expected = cfg.model.num_classes or (len(classes) if classes else None)
    if expected is not None and expected != model.num_classes:
        raise ValueError(f"{config} is a recipe for {expected} classes but the model predicts {model.num_classes}: "
                         f"pass the config of the model's dataset")
    set_test_recipe(model, cfg)
    if not getattr(model, "class_names", None) and classes and len(classes) == model.num_classes:
        set_labels(model, classes, palette)


def _own_classes(cfg: Any) -> tuple[list | None, list | None]:
    """The class names and palette of a folder dataset's recipe: its ``data`` kwargs, else its ``dataset.yaml``
    (read as training reads it) where the data root is on this machine; (None, None) where neither says."""
    from .data.datasets import read_dataset_yaml

    d = cfg.data
    kwargs = {**d.kwargs, **d.val_kwargs}
    if "classes" not in kwargs and d.dataset == "folder" and d.root:
        meta = Path(d.root).expanduser() / kwargs.get("meta_file", "dataset.yaml")
        if meta.is_file():
            kwargs = {**read_dataset_yaml(meta), **kwargs}
    classes = kwargs.get("classes")
    return (list(classes), kwargs.get("palette")) if isinstance(classes, list) else (None, None)


# ------------------------------------------------------------------------------------ train, eval, demo, distill
def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine.train import train

    with _same_on_every_rank():
        cfg = load_config(args.config, args.set or [])
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    out = train(cfg, work_dir, resume=args.resume, progress=not args.no_progress)
    best = out["best_mIoU"]
    if out.get("rank", 0) == 0:
        print(f"trained {out['model'].model_name} for {out['iteration']} iterations"
              f"{f', best mIoU {best:.2f}' if best is not None else ''}; checkpoints in {work_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .config import load_config, validate
    from .engine.evaluate import build_val_dataset, evaluate, metrics_table
    from .engine.train import check_class_count

    cfg = load_config(args.config, list(args.set or []))
    if args.mode or args.tta:  # checked as flags: the recipe may lack what --mode slide needs
        cfg.eval.mode, cfg.eval.tta = args.mode or cfg.eval.mode, cfg.eval.tta or args.tta
        flags = " ".join(f for f in (args.mode and f"--mode {args.mode}", args.tta and "--tta") if f)
        validate(cfg, f"{flags} with {args.config}")
    dataset = build_val_dataset(cfg)
    model = _segmentation_model(load_model(args.checkpoint), args.checkpoint)
    check_class_count(cfg, dataset, model.num_classes, f"checkpoint '{args.checkpoint}' predicts "
                      f"{model.num_classes} classes", "pass the config of the checkpoint's dataset", split="val")
    if model.model_name != cfg.model.name:  # mmseg builds the config's model; here the file's own is scored
        print(f"edgeseg eval: warning: '{args.checkpoint}' holds {model.model_name} but {args.config} builds "
              f"{cfg.model.name}: scoring the checkpoint's model with the recipe's data and test pipeline",
              file=sys.stderr)
    model_name = model.model_name
    model = model.to(_device(args.device))
    if args.fuse:
        model = model.fuse()
    save = _prediction_writer(Path(args.out), dataset, getattr(model, "palette", None)) if args.out else None
    result = evaluate(model, dataset, cfg.eval, workers=cfg.data.workers, progress=not (args.json or args.no_progress),
                      callback=save)
    if args.json:
        print(json.dumps({"model": model_name, "checkpoint": args.checkpoint, **result}, indent=2))
    else:
        tta = " + TTA" if cfg.eval.tta else ""
        print(f"{model_name} ({args.checkpoint}) on {cfg.data.dataset} val, {cfg.eval.mode}{tta}:\n"
              f"{metrics_table(result)}")
    return 0


def _prediction_writer(out: Path, dataset: Any, palette: Any) -> Any:
    """``eval --out``: the callback that writes each prediction as ``<sample>.png`` (the model's palette, else the
    dataset's), refused before anything runs where a prediction would overwrite a file of the dataset."""
    from .data import save_label_png

    palette = palette or dataset.palette
    dataset_files = {Path(p).resolve() for files in (getattr(dataset, "ann_files", ()),
                                                      getattr(dataset, "img_files", ())) for p in files}
    for i in range(len(dataset)):
        written = out / f"{dataset.sample_name(i)}.png"
        if written.resolve() in dataset_files:
            raise ValueError(f"--out {out}: {written} is a file of the evaluated dataset and would be overwritten "
                             f"by a prediction: choose another --out folder")
    out.mkdir(parents=True, exist_ok=True)

    def save(name: str, pred: Any, gt: Any) -> None:
        save_label_png(pred.numpy(), out / f"{name}.png", palette)

    return save


def cmd_demo(args: argparse.Namespace) -> int:
    from .engine.demo import run_demo

    run_demo(args.work_dir, iters=args.iters, minutes=args.minutes, progress=not args.no_progress)
    return 0


def _set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """Recipe overrides: ``--set`` one per flag, repeatable (several would swallow a CONFIG given after them), and
    mmseg's ``--cfg-options a=1 b=2``, several per flag, as its users write them."""
    parser.add_argument("--set", dest="set", action="append", metavar="KEY=VALUE",
                        help=f"recipe override (dotted key, value read as YAML), repeatable, e.g. {example}")
    parser.add_argument("--cfg-options", dest="set", action="extend", nargs="+", metavar="KEY=VALUE",
                        help="several overrides after one flag, as mmseg's tools take them")


def _engine_parsers(sub: Any) -> None:
    p = sub.add_parser("train",
                       help="train from a recipe YAML (torchrun --nproc-per-node N -m edgeseg train ... for DDP)")
    p.add_argument("config", help="recipe YAML, e.g. configs/topformer_tiny_ade20k_512x512_160k.yaml")
    _set_argument(p, "--set optim.lr=1e-4")
    p.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    p.add_argument("--resume", metavar="auto|PATH", help="continue exactly: 'auto' = <work-dir>/latest.pth if present")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="mIoU / mAcc / aAcc of a checkpoint on a recipe's validation split")
    p.add_argument("config", help="recipe YAML (dataset, test pipeline, eval mode)")
    p.add_argument("--checkpoint", required=True, help="checkpoint in any supported layout")
    p.add_argument("--mode", choices=["whole", "slide"], help="override eval.mode")
    p.add_argument("--tta", action="store_true", help="multi-scale (eval.tta_ratios) + flip test-time augmentation")
    _set_argument(p, "--set data.root=/data/ade")
    p.add_argument("--out", metavar="DIR", help="also write every prediction as a palette PNG of class indices")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--fuse", action="store_true", help="evaluate fuse()'s inference form (the same logits up to "
                                                        "float32 rounding, faster) instead of the published "
                                                        "computation")
    p.add_argument("--json", action="store_true", help="one JSON object: model, checkpoint, mIoU, mAcc, aAcc (%%), "
                                                        "per_class, num_images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="train TopFormer-Tiny from scratch on procedural scenes on the CPU, then report")
    p.add_argument("--work-dir", default="work_dirs/demo", help="output folder (default: work_dirs/demo)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--iters", type=POSITIVE_INT,
                        help="training iterations (default 900, about 2.5 min of training on 2 idle cores)")
    length.add_argument("--minutes", type=POSITIVE_FLOAT,
                        help="instead of --iters: fit the iteration count to this time budget")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)


def cmd_distill(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine.distill import distill

    with _same_on_every_rank():
        cfg = load_config(args.config, args.set or [])
        if cfg.distill is None:
            raise ValueError(f"config '{args.config}' has no distill: section: use a distillation recipe, "
                             "e.g. configs/dynasegformer_b0_ade20k_30.yaml or "
                             "configs/topformer_tiny_dynamic_ade20k_30.yaml")
    if args.teacher:
        cfg.distill.teacher = args.teacher
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    out = distill(cfg, work_dir, resume=args.resume, progress=not args.no_progress)
    miou = (out["last_eval"] or {}).get("mIoU")
    if out["rank"] == 0:
        print(f"distilled {out['model'].model_name} at sparsity {cfg.distill.sparsity} for {out['iteration']} "
              f"iterations{f', mIoU {miou:.2f}' if miou is not None else ''}; student: {work_dir / 'final.pth'}")
    return 0


def _distill_parser(sub: Any) -> None:
    p = sub.add_parser("distill", help="two-stage distillation of a dense model into its dynamic (DGL) form "
                       "(torchrun --nproc-per-node N -m edgeseg distill ... for DDP)")
    p.add_argument("config", help="recipe YAML with a distill: section, e.g. configs/dynasegformer_b0_ade20k_30.yaml")
    p.add_argument("--teacher", metavar="CKPT", help="dense teacher checkpoint (any layout), needed unless the recipe "
                   "sets distill.teacher: a SegFormer of the DynaSegFormer's size, or the TopFormer variant of a "
                   "dynamic TopFormer recipe")
    _set_argument(p, "--set distill.sparsity=0.5")
    p.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    p.add_argument("--resume", metavar="auto|PATH", help="continue exactly: 'auto' = <work-dir>/latest.pth if present")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_distill)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="edgeseg", description="Efficient semantic segmentation on edge devices.")
    parser.add_argument("--version", action="version", version=f"edgeseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="params, GMACs and the paper's figures of one or all models")
    p.add_argument("model", nargs="?", help="model name or checkpoint path (omit for the table of all models)")
    p.add_argument("--size", nargs=2, type=POSITIVE_INT, metavar=("H", "W"), help="input size (default: the paper's)")
    _model_arguments(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="latency of a model (median and p90 after warm-up)")
    p.add_argument("model", help="model name or checkpoint path")
    p.add_argument("--size", nargs=2, type=POSITIVE_INT, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--batch", type=POSITIVE_INT, default=1)
    p.add_argument("--threads", type=POSITIVE_INT, help="torch intra-op threads (default: torch's)")
    p.add_argument("--fuse", action="store_true", help="benchmark the inference form (BN folded, decoder folded)")
    _model_arguments(p)
    p.add_argument("--seconds", type=POSITIVE_FLOAT, default=3.0, help="minimum timed duration")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("convert", help="rewrite any supported checkpoint in edgeseg or Hugging Face layout")
    p.add_argument("src", help="checkpoint file or Hugging Face folder")
    p.add_argument("dst", help="output file (edgeseg) or folder (hf)")
    p.add_argument("--to", choices=["edgeseg", "hf"], default="edgeseg")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="ONNX graph of a model's inference form, checked with onnxruntime")
    p.add_argument("model", help="model name or checkpoint path (any supported layout)")
    p.add_argument("out", help="output .onnx file")
    p.add_argument("--size", nargs=2, type=POSITIVE_INT, metavar=("H", "W"),
                   help="input size, fixed in the graph unless --dynamic (default: the window a slide recipe's "
                        "model carries, else 512 512)")
    p.add_argument("--batch", type=POSITIVE_INT, default=1, help="batch size, fixed in the graph unless --dynamic")
    _model_arguments(p)
    p.add_argument("--opset", type=POSITIVE_INT, help="ONNX opset (default: 17; 18 with --exporter dynamo)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx's TorchScript tracer (default) or its torch.export-based one (needs onnxscript)")
    p.add_argument("--no-fuse", action="store_true", help="export the eager model instead of fuse()'s form")
    p.add_argument("--dynamic", action="store_true",
                   help="leave batch, height and width free in the graph (SegFormer and MiT; TorchScript exporter)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="segment images and videos: palette label PNGs and overlays")
    p.add_argument("model", help="checkpoint path (any supported layout) or model name")
    p.add_argument("images", nargs="+", help="image files or folders of them, or videos (.mp4, .mov, .avi, .mkv, "
                                             ".webm...; the [video] extra): label PNGs per frame and an overlay .mp4")
    p.add_argument("--out", default="predictions", help="output folder")
    p.add_argument("-r", "--recursive", action="store_true",
                   help="a folder's subfolders too, their predictions in the same subfolders of --out")
    p.add_argument("--scale", nargs=2, type=POSITIVE_INT, metavar=("LONG", "SHORT"),
                   help="keep-ratio test resize bound (default: the training recipe's data.test_scale, which edgeseg "
                        "checkpoints carry, else ADE20K's 2048 512)")
    p.add_argument("--size-divisor", type=POSITIVE_INT,
                   help="round the resized image up to a multiple (default: the recipe's data.size_divisor with its "
                        "scale, else none; SegFormer's ADE20K recipe: 32)")
    p.add_argument("--config", help="a recipe whose test pipeline to use (data.test_scale, size_divisor, mean, std; "
                                    "eval's sliding window): for files that carry none, e.g. official checkpoints")
    p.add_argument("--mode", choices=["whole", "slide"],
                   help="one forward per image, or the recipe's sliding window (default: the recipe's eval.mode)")
    _model_arguments(p, builder=False)
    p.add_argument("--no-fuse", action="store_true", help="run the eager model instead of fuse()'s inference form")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_predict)

    _engine_parsers(sub)
    _distill_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .deploy.allocator import keep_freed_memory_unless_disabled

    args = build_parser().parse_args(argv)
    keep_freed_memory_unless_disabled()  # the command owns its process: reuse freed tensor memory (see allocator.py)
    try:
        with _one_line_warnings(args.command):
            code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, inside the handler below, not as Python exits
        return code
    except BrokenPipeError:  # the reader went away (`edgeseg info | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 1
    except (OSError, ValueError, ImportError) as err:  # user errors: one line, no traceback
        _end_progress_bars()
        if not getattr(err, "same_on_every_rank", False) or os.environ.get("RANK", "0") == "0":
            print(f"edgeseg {args.command}: error: {_explain(err, args)}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _same_on_every_rank() -> Iterator[None]:
    """Mistakes in a recipe's content, which every torchrun process reads alike: only rank 0 says them (the others
    exit with the same code), so a typo in a recipe prints one line, not one per process. Errors that may differ
    between processes (a file missing on one node, data, devices, checkpoints) are said by each."""
    try:
        yield
    except ValueError as err:
        err.same_on_every_rank = True
        raise


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """edgeseg's own warnings as one line, like its errors: Python's format adds the warning's source path and line
    of code, which say nothing to a user of the command line. Other libraries' warnings keep theirs."""
    import warnings

    package, original = str(Path(__file__).parent) + os.sep, warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and str(filename).startswith(package):
            print(f"edgeseg {command}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def _end_progress_bars() -> None:
    """Close the tqdm bars a failing command left open: a bar's last state has no newline, and the one-line error
    would otherwise continue it (in a log file, on the same line)."""
    tqdm = sys.modules.get("tqdm")
    bars = list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()))
    for bar in bars:
        ends_line = getattr(bar, "leave", True)  # a transient bar (leave=False) is erased by '\r', not ended
        bar.close()
        if not ends_line and not getattr(bar.fp, "isatty", lambda: False)():
            bar.fp.write("\n")  # a log file keeps the erased bar's text; the error starts a line of its own


def _explain(err: Exception, args: argparse.Namespace) -> str:
    """The one-line message of a user error; errors PyTorch raises from deep inside whose fix is in the recipe get
    that fix."""
    message = str(err)
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.filename is not None:
        # FileExistsError, IsADirectoryError, PermissionError, a full disk: the path and the reason
        return f"cannot use '{err.filename}' ({err.strerror}): choose another path"
    if message.startswith("Caught ") and "\nOriginal Traceback" in message:
        # raised in a DataLoader worker: PyTorch re-raises it with the worker's traceback; the error is its last line
        message = message.rstrip().splitlines()[-1].partition(": ")[2] or message.splitlines()[0]
    if message.startswith("Expected more than 1 value per channel when training"):
        # TopFormer's extractor runs BatchNorm on ⌈H/64⌉ × ⌈W/64⌉ tokens: one image of ≤ 64×64 is one value.
        shape = message.rpartition("input size ")[2]
        return (f"{getattr(args, 'config', 'the recipe')}: a BatchNorm layer saw one value per channel while training "
                f"(its input {shape}): give each process more pixels per step — raise data.batch_size or "
                "data.crop_size")
    return message


if __name__ == "__main__":
    sys.exit(main())
