"""One checkpoint loader for every layout a user may hold.

Users arrive with official mmseg ``.pth`` files, ImageNet backbone files, Hugging Face folders or edgeseg's own
checkpoints; none of them should have to name the format or the architecture. Reading, layout detection (delegated
to each family's ``convert_state_dict``) and strict loading with readable errors all live here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .fileio import atomic_write, read_weights
from .models import FAMILIES, MODELS, create_model, family_of

EDGESEG_FORMAT = "edgeseg"
# what a recipe's eval sees images with, beside the normalisation: attributes of a model, entries of its checkpoint
TEST_PIPELINE_KEYS = ("test_scale", "test_size_divisor", "test_crop_size", "test_stride")


@dataclass
class LoadReport:
    """What a load did: the layout it recognised, and every key it could not place."""

    family: str
    layout_notes: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded a {self.family} checkpoint"]
        lines += [f"  note: {n}" for n in self.layout_notes]
        for label, keys in (("missing", self.missing_keys), ("unexpected", self.unexpected_keys),
                            ("skipped", self.skipped_keys)):
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... (+{len(keys) - 6})" if len(keys) > 6 else "")
                lines.append(f"  {label} ({len(keys)}): {shown}")
        return "\n".join(lines)


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file as a dict, safely (``weights_only=True``), with a one-line error on failure."""
    obj = read_weights(path)
    if Path(path).suffix == ".safetensors":
        return {"state_dict": obj}
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a state dict: pass a file saved from "
                         f"model.state_dict() or by edgeseg, mmseg or Hugging Face")
    return obj


def unwrap_state_dict(ckpt: dict[str, Any]) -> dict[str, Tensor]:
    """The weights inside a checkpoint dict: mmcv's ``state_dict``, the ImageNet files' ``state_dict_ema``
    (official TopFormer backbones are loaded from the EMA weights), ``model`` (DeiT-style) or a bare state dict."""
    for key in ("state_dict_ema", "state_dict", "model"):
        if key in ckpt and isinstance(ckpt[key], dict):
            sd = ckpt[key]
            break
    else:
        sd = ckpt
    sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect_layout(sd: dict[str, Tensor], source: str = "checkpoint") -> tuple[str, dict[str, Tensor], list[str]]:
    """Find the family whose layout the keys are in; return (family, edgeseg-layout state dict, notes)."""
    for fam_name, fam in FAMILIES.items():
        converted = fam.convert_state_dict(sd)
        if converted is not None:
            return fam_name, converted[0], converted[1]
    if not any(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{source} holds no weights (no tensors among its {len(sd)} entries): pass a checkpoint of "
                         f"a model")
    sample = ", ".join(list(sd)[:3])
    raise ValueError(f"{source}: keys ({sample}, ...) match no supported layout "
                     f"({', '.join(FAMILIES)} in official, Hugging Face or edgeseg form)")


# Where each family keeps its decode head (TopFormer ``head.``, SegFormer ``decode_head.``): what drop_head may skip.
HEAD_PREFIXES = ("head.", "decode_head.")


def _model_family(model: nn.Module) -> str:
    if getattr(model, "model_name", None) is None:
        raise TypeError("load_checkpoint expects an edgeseg model (built by edgeseg.create_model)")
    return family_of(model)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                    drop_head: bool = False) -> LoadReport:
    """Load any supported checkpoint into ``model`` and report what happened.

    - The layout (official, ImageNet backbone, Hugging Face, edgeseg) is detected from the keys.
    - An ImageNet classification checkpoint given to a segmentation model loads the backbone; the classifier head
      and the model's decode head are reported (skipped / missing) rather than failing: that is its purpose.
    - A class-count mismatch, or another decode head (TopFormer-Tiny's Cityscapes head is dense where its ADE20K
      head is depthwise), fails naming both, unless ``drop_head=True``: the model then keeps its own head tensors
      where the file's do not fit, as mmseg's ``load_from`` starts from another dataset's model. The backbone
      must fit either way.
    - ``strict=False`` tolerates missing/unexpected keys (still reported); shape mismatches always fail.
    """
    path = Path(path)
    if _is_hf_folder(path):
        from .models.hf_segformer import load_hf_folder

        sd = load_hf_folder(path).state_dict()
    else:
        sd = unwrap_state_dict(read_checkpoint(path))
    return _load_state_dict(model, sd, path, strict, drop_head)


def _load_state_dict(model: nn.Module, sd: dict[str, Tensor], path: Path, strict: bool, drop_head: bool,
                     fix: str | None = None) -> LoadReport:
    """:func:`load_checkpoint` of a state dict already read from ``path`` (named in the errors); ``fix`` ends the
    errors of a strict load whose keys or head do not fit (``load_model``'s: the model was built from the file)."""
    head_fix = fix or "pass drop_head=True to load all but the head tensors that do not fit (a config's " \
                      "model.pretrained does)"
    shape_fix = fix or f"build it with edgeseg.load_model('{path}')"
    fix = fix or f"build it with edgeseg.load_model('{path}'), or pass strict=False to load the rest"
    family, sd, notes = detect_layout(sd, source=f"checkpoint '{path}'")
    target = _model_family(model)
    if family != target:
        src = FAMILIES[family].infer_model(sd)[0]
        raise ValueError(f"checkpoint '{path}' holds a {family} model ({src}) but the model is "
                         f"{model.model_name} ({target}): build it with edgeseg.load_model('{path}')")
    report = LoadReport(family=family, layout_notes=list(notes))

    own = model.state_dict()
    try:
        src_name, src_args = FAMILIES[family].infer_model(sd)
    except ValueError:  # what tensors cannot show (a SegFormer's head counts): the model describes the file,
        src_name, src_args = model.model_name, dict(model.model_args)  # its classifier the class count
        classifier = next((sd[k] for k in ("decode_head.linear_pred.weight", "head.weight") if k in sd), None)
        if classifier is not None:
            src_args["num_classes"] = classifier.shape[0]
    backbone_only = src_name.endswith("-cls") or (src_name.startswith("mit-") and
                                                  not model.model_name.startswith("mit-"))
    backbone_only = backbone_only and src_name != model.model_name
    if backbone_only:  # ImageNet file into a segmentation model: keep what both share
        report.skipped_keys = [k for k in sd if k not in own]
        sd = {k: v for k, v in sd.items() if k in own}
        report.layout_notes.append(f"backbone weights from {src_name}; classifier skipped")

    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    head = _unfit_head(sd, own, mismatched, src_args.get("num_classes"), model) if mismatched else None
    if head is not None:
        dropped, differs, note = head
        if not drop_head:
            raise ValueError(f"checkpoint '{path}' {differs}: {head_fix}")
        report.skipped_keys += dropped
        report.layout_notes.append(note)
        sd = {k: v for k, v in sd.items() if k not in dropped}
    elif mismatched:
        k = mismatched[0]
        raise ValueError(f"checkpoint '{path}' does not fit {model.model_name}: {len(mismatched)} tensors differ in "
                         f"shape (e.g. {k}: {list(sd[k].shape)} vs {list(own[k].shape)}); it holds {src_name} "
                         f"{src_args}, the model is {model.model_name} {model.model_args}: {shape_fix}")

    result = model.load_state_dict(sd, strict=False)
    report.missing_keys = [k for k in result.missing_keys if k not in report.skipped_keys]
    report.unexpected_keys = list(result.unexpected_keys)
    if strict and not backbone_only and (report.missing_keys or report.unexpected_keys):  # dropped head: skipped
        raise ValueError(f"checkpoint '{path}' does not match {model.model_name}: "
                         f"{len(report.missing_keys)} missing keys (e.g. {report.missing_keys[:2]}), "
                         f"{len(report.unexpected_keys)} unexpected (e.g. {report.unexpected_keys[:2]}); "
                         f"it holds {src_name} {src_args}: {fix}")
    return report


def _unfit_head(sd: dict[str, Tensor], own: dict[str, Tensor], mismatched: list[str], src_classes: int | None,
                model: nn.Module) -> tuple[list[str], str, str] | None:
    """Where every tensor of ``sd`` that does not fit ``own`` is the head's (another class count, or another decode
    head): the tensors to drop, what differs (an error's words) and the note of dropping them; else None."""
    classifier = [k for k in mismatched if src_classes != model.num_classes and sd[k].ndim >= 1 and own[k].ndim >= 1
                  and sd[k].shape[0] == src_classes and own[k].shape[0] == model.num_classes]
    in_head = [k for k in mismatched if k.startswith(HEAD_PREFIXES)]
    only_classifier = classifier == mismatched
    if not (only_classifier or in_head == mismatched):
        return None
    differs = [f"{src_classes} classes but the model has {model.num_classes}"] if classifier else []
    if not only_classifier:  # named by a head tensor other than the classifier's
        k = next(k for k in in_head if k not in classifier)
        differs.append(f"another decode head (e.g. {k}: {list(sd[k].shape)} vs {list(own[k].shape)})")
    if only_classifier:
        return classifier, "has " + " and ".join(differs), (
            f"classifier ({src_classes} classes) dropped; the model keeps its own {model.num_classes}-class classifier")
    return in_head, "has " + " and ".join(differs), (
        f"{len(in_head)} decode-head tensors that do not fit dropped ({', '.join(in_head)}): the model keeps its own")


def set_labels(model: nn.Module, class_names: Any = None, palette: Any = None) -> nn.Module:
    """Attach class names and an RGB palette to ``model`` (``model.class_names``, ``model.palette``), each only if
    it has one entry per output class: they travel with it into checkpoints, Hugging Face folders and predictions, so
    a model trained on a custom dataset labels and colours its outputs as that dataset does."""
    k = getattr(model, "num_classes", None)
    if isinstance(class_names, (list, tuple)) and len(class_names) == k:
        model.class_names = [str(c) for c in class_names]
    if isinstance(palette, (list, tuple)) and len(palette) == k and all(
            isinstance(c, (list, tuple)) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette):
        model.palette = [tuple(int(v) for v in c) for c in palette]
    return model


def set_normalization(model: nn.Module, mean: Any = None, std: Any = None) -> nn.Module:
    """Attach the input normalisation the model was trained with, ``(x − mean) / std`` on RGB 0–255 pixels
    (``model.input_mean``, ``model.input_std``): it travels into checkpoints, so prediction and ONNX metadata
    normalise as training did. Models without it take ImageNet's, as every published recipe does."""
    if mean is not None and std is not None:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):  # a zero std turns every pixel into NaN
            raise ValueError(f"input normalisation mean {list(mean)}, std {list(std)}: expected three values each "
                             f"(RGB, 0–255 scale), std positive")
        model.input_mean, model.input_std = mean, std
    return model


def set_test_resize(model: nn.Module, scale: Any = None, size_divisor: int | None = None) -> nn.Module:
    """Attach the test resize the model's recipe evaluates with (``data.test_scale``, ``data.size_divisor``, as
    ``model.test_scale``, ``model.test_size_divisor``): it travels into checkpoints, so ``predict`` and the
    ``Segmenter`` see images at the scale the model was trained for (ADE20K's 2048×512 bound would shrink a
    Cityscapes image and enlarge a small one). Models without it get ADE20K's, as the official releases test."""
    if scale is not None:
        model.test_scale = tuple(int(v) for v in scale)
        model.test_size_divisor = int(size_divisor) if size_divisor else None
    return model


def check_window(crop: Sequence[int], stride: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(crop, stride)`` as (H, W) int pairs, or a one-line error: positive, and no stride past its crop (the
    windows would leave pixels unseen)."""
    crop_t, stride_t = tuple(int(v) for v in crop), tuple(int(v) for v in stride)
    if len(crop_t) != 2 or len(stride_t) != 2 or min(crop_t + stride_t) < 1 or any(
            s > c for s, c in zip(stride_t, crop_t)):
        raise ValueError(f"sliding window crop {list(crop_t)} stride {list(stride_t)}: give (H, W) pairs of positive "
                         f"sizes with each stride at most its crop")
    return crop_t, stride_t


def set_test_windows(model: nn.Module, crop_size: Any = None, stride: Any = None) -> nn.Module:
    """Attach the sliding window the model's recipe evaluates with (``eval.mode: slide`` with ``eval.crop_size``
    and ``eval.stride``, as ``model.test_crop_size``, ``model.test_stride``), or clear it (``None``: whole images).
    It travels into checkpoints like the test resize: SegFormer's Cityscapes recipe slides 1024×1024 windows every
    768 pixels over 2048×1024 images, and one forward over the whole image is another computation."""
    window = check_window(crop_size, stride) if crop_size is not None and stride is not None else (None, None)
    model.test_crop_size, model.test_stride = window
    return model


def set_test_recipe(model: nn.Module, cfg: Any) -> nn.Module:
    """Attach everything a recipe (a :class:`~edgeseg.config.Config`) tests with — normalisation, test resize,
    sliding window — so its checkpoints, ``predict`` and the ONNX metadata see images as its ``eval`` does."""
    set_normalization(model, cfg.data.mean, cfg.data.std)
    set_test_resize(model, cfg.data.test_scale, cfg.data.size_divisor)
    slide = cfg.eval.mode == "slide"
    return set_test_windows(model, cfg.eval.crop_size if slide else None, cfg.eval.stride if slide else None)


def checkpoint_labels(ckpt: dict[str, Any]) -> tuple[Any, Any]:
    """The class names and palette a checkpoint carries, or None: edgeseg's ``class_names``/``palette``, mmseg 0.x's
    ``meta.CLASSES``/``meta.PALETTE`` (official releases), mmseg 1.x's ``meta.dataset_meta``."""
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    dataset_meta = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    names = ckpt.get("class_names") or meta.get("CLASSES") or dataset_meta.get("classes")
    palette = ckpt.get("palette") or meta.get("PALETTE") or dataset_meta.get("palette")
    return names, palette


def load_model(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Build the right model for any supported checkpoint and load it strictly.

    edgeseg checkpoints name their architecture; for official and Hugging Face files the variant and class count are
    read off the tensor shapes, so a user holding only an official ``.pth`` never guesses the architecture. Class
    names and palette come along where the file has them (:func:`checkpoint_labels`).
    """
    path = Path(path)
    if _is_hf_folder(path):
        from .models.hf_segformer import load_hf_folder

        hf = load_hf_folder(path)  # with what the folder keeps beside the weights (labels, normalisation, resize)
        if not overrides:
            return hf
        name, args, raw = hf.model_name, dict(hf.model_args), hf.state_dict()
        labels = (getattr(hf, "class_names", None), getattr(hf, "palette", None))
        normalization = (getattr(hf, "input_mean", None), getattr(hf, "input_std", None))
        resize = (getattr(hf, "test_scale", None), getattr(hf, "test_size_divisor", None))
        windows = (getattr(hf, "test_crop_size", None), getattr(hf, "test_stride", None))
    else:
        ckpt = read_checkpoint(path)
        raw, labels = unwrap_state_dict(ckpt), checkpoint_labels(ckpt)
        normalization, resize, windows = _test_pipeline(ckpt)
        if ckpt.get("format") == EDGESEG_FORMAT and ckpt.get("model_name") in MODELS:
            name, args = ckpt["model_name"], ckpt.get("model_args", {})
            if not isinstance(args, dict):
                raise ValueError(f"checkpoint '{path}': model_args is {args!r}, not a mapping of builder arguments "
                                 f"(an edited file?): save the model again")
            args = dict(args)
        else:  # foreign layouts, and models saved without a registered name (built from their class)
            family, sd, _ = detect_layout(raw, source=f"checkpoint '{path}'")
            try:
                name, args = FAMILIES[family].infer_model(sd)
            except ValueError as err:  # shapes no variant has, or no head to count the classes by
                raise ValueError(f"checkpoint '{path}': {err}") from err
            # What the layout implies beyond the shapes (LayerNorm eps of mmsegmentation's or HF's SegFormer), where
            # a family says.
            layout_args = getattr(FAMILIES[family], "layout_args", None)
            if layout_args is not None:
                args.update(layout_args(raw))
    if overrides.get("num_classes", args.get("num_classes")) != args.get("num_classes"):
        raise ValueError(f"checkpoint '{path}' has {args.get('num_classes')} classes, not {overrides['num_classes']}: "
                         f"leave the class count out (to fine-tune for other classes, start a training run from it: "
                         f"model.pretrained)")
    dynamic = "sparsity" in args or args.get("dynamic") or name.startswith("dynasegformer-")
    if "sparsity" in overrides and not dynamic:  # a dense family's builder takes no sparsity
        raise ValueError(f"checkpoint '{path}' holds {name}, a dense model: a sparsity needs a dynamic checkpoint "
                         f"(edgeseg distill makes one)")
    model = create_model(name, **{**args, **overrides})
    try:
        _load_state_dict(model, raw, path, strict=True, drop_head=False,
                         fix="its tensors are not those of that model (a damaged or edited file?)")
    except ValueError as err:
        changed = {k: v for k, v in overrides.items() if args.get(k) != v}
        if not changed:
            raise
        raise ValueError(f"checkpoint '{path}' holds {name} {args}, which {changed} does not fit: leave it "
                         f"out") from err
    try:
        set_normalization(model, *normalization)
        set_test_resize(model, *resize)
        set_test_windows(model, *windows)
    except (TypeError, ValueError) as err:  # an edited or damaged entry beside sound weights
        raise ValueError(f"checkpoint '{path}': its test pipeline is malformed ({err}): save the model again, "
                         f"or delete the entry to fall back to the defaults") from err
    return set_labels(model, *labels).eval()


def _test_pipeline(ckpt: dict[str, Any]) -> list[tuple[Any, Any]]:
    """Normalisation, test resize and sliding window a checkpoint carries, each a pair (or two Nones).

    Checkpoints from ``train``/``distill`` also keep their recipe (``config``). Files written before an entry
    travelled on its own carry it only there: the recipe's value then stands in, so an older Cityscapes checkpoint
    still slides its windows in ``predict`` as its ``eval`` did. An entry the file has always wins."""
    pairs = [(ckpt.get("input_mean"), ckpt.get("input_std")), (ckpt.get("test_scale"), ckpt.get("test_size_divisor")),
             (ckpt.get("test_crop_size"), ckpt.get("test_stride"))]
    cfg = ckpt.get("config") if ckpt.get("format") == EDGESEG_FORMAT else None
    if not isinstance(cfg, dict):
        return pairs
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    test = cfg.get("eval") if isinstance(cfg.get("eval"), dict) else {}
    slide = test.get("mode") == "slide"
    recipe = [(data.get("mean"), data.get("std")), (data.get("test_scale"), data.get("size_divisor")),
              (test.get("crop_size"), test.get("stride")) if slide else (None, None)]
    return [pair if any(v is not None for v in pair) else old for pair, old in zip(pairs, recipe)]


def _plain(value: Any) -> Any:
    """Tuples as lists, all the way down: checkpoints hold only plain lists, strings and numbers."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(path: str | os.PathLike, model: nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Write an edgeseg checkpoint: weights plus what rebuilds the model, plus any training state in ``extra``."""
    model = getattr(model, "module", model)  # unwrap DDP
    obj = {
        "format": EDGESEG_FORMAT,
        "model_name": model.model_name,
        "model_args": dict(model.model_args),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    for key in ("class_names", "palette", "input_mean", "input_std") + TEST_PIPELINE_KEYS:
        if getattr(model, key, None):
            obj[key] = _plain(getattr(model, key))
    obj.update(extra or {})
    return atomic_save(obj, path)
