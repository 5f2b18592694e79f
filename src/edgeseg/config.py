"""Experiment configs: plain dataclasses, one flat YAML file per paper run, dotted command-line overrides.

A config value travels YAML / ``--set`` → the dataclass field below → the constructor that uses it; there is no
inheritance chain and no registry string in between. Every field is typed, and the type converts what YAML or the
command line gives (PyYAML reads ``6e-5`` as a *string*; the ``float`` field turns it into a number). A key that is
not a field fails with the nearest valid key, so a typo never silently trains the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .fileio import read_yaml, write_text


@dataclass
class ModelCfg:
    """Which network to build: ``create_model(name, num_classes, **overrides)``."""

    name: str = "topformer-tiny"
    num_classes: int | None = None  # None: the dataset's class count
    overrides: dict[str, Any] = field(default_factory=dict)  # builder kwargs, e.g. {head_channels: 128}
    pretrained: str | None = None  # ImageNet backbone checkpoint (any layout the loader detects)


@dataclass
class DataCfg:
    """Dataset and the mmseg train/test pipelines (Resize → RandomCrop → Flip → PhotoMetric; Resize at test)."""

    dataset: str = "ade20k"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    crop_size: tuple[int, int] = (512, 512)  # (H, W)
    scale: tuple[int, int] = (2048, 512)  # mmseg img_scale (long, short) before the random ratio
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    test_scale: tuple[int, int] = (2048, 512)
    size_divisor: int | None = None  # test images resized to a multiple of this (mmseg ResizeToMultiple)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    batch_size: int = 16  # TOTAL images per optimizer step, split over processes and grad_accum micro-steps
    workers: int = 2  # DataLoader workers per process
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra build_dataset kwargs, train and val
    train_kwargs: dict[str, Any] = field(default_factory=dict)  # ... train only (merged over kwargs)
    val_kwargs: dict[str, Any] = field(default_factory=dict)  # ... val only


@dataclass
class OptimCfg:
    """AdamW with the official ``paramwise_cfg`` (the decode head at ``head_lr_mult`` × lr, no weight decay on
    LayerNorms and position blocks), as :func:`edgeseg.engine.optim.param_groups` reads it from mmcv's keys."""

    lr: float = 6e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    head_lr_mult: float = 10.0
    head_prefixes: tuple[str, ...] = ("decode_head.", "head.")  # SegFormer's, TopFormer's
    norm_decay_mult: float = 0.0
    pos_decay_mult: float = 0.0


@dataclass
class ScheduleCfg:
    """mmcv's iteration-based poly schedule with linear warm-up (``lr_config`` of every official run)."""

    iters: int = 160_000
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0


@dataclass
class TrainCfg:
    """Loop mechanics: precision, accumulation, intervals, seed, BN synchronisation."""

    amp: str = "none"  # none | bf16 | fp16 (fp16 needs CUDA; bf16 autocast works on CPU and CUDA)
    grad_accum: int = 1
    log_interval: int = 50
    eval_interval: int = 16_000  # 0: never during training
    checkpoint_interval: int = 16_000
    max_keep_checkpoints: int = 0  # the newest N iter_*.pth of the run are kept; 0 keeps all (mmseg's default)
    seed: int = 0
    sync_bn: bool = True  # official runs use SyncBN; only possible with CUDA + DDP
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class EvalCfg:
    """mmseg test protocol: whole image or sliding window, optional multi-scale + flip TTA (softmax average)."""

    mode: str = "whole"  # whole | slide
    crop_size: tuple[int, int] | None = None  # slide window (H, W)
    stride: tuple[int, int] | None = None  # slide stride (H, W)
    tta: bool = False
    tta_ratios: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    tta_flip: bool = True


@dataclass
class DistillCfg:
    """DynaSegFormer's two-stage distillation (paper Sec. 2.4), also for dynamic TopFormers; stage 2 runs
    ``schedule.iters`` iterations."""

    teacher: str | None = None  # dense teacher checkpoint (any layout); ``edgeseg distill --teacher`` sets it
    sparsity: float = 0.3  # s: fraction of gated neurons pruned per image at the end of annealing
    anneal_iters: int = 8000  # T of s_t = s · min(1, t / T), counted over both stages
    stage1_iters: int = 16000  # feature-alignment iterations before the label stage
    lambda_gate: float = 1e-5  # λ_m on Σ‖G‖₁
    lambda_soft: float = 1.0  # λ_s on the soft cross-entropy to the teacher's logits
    temperature: float = 1.0  # τ of the soft cross-entropy


@dataclass
class Config:
    """One experiment. ``reference`` records facts of the official run that edgeseg does not use (e.g. GPU count).

    ``distill`` is an optional section: None unless the YAML has a ``distill:`` mapping (distillation recipes).
    """

    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    reference: dict[str, Any] = field(default_factory=dict)
    distill: DistillCfg | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able dict (tuples as lists); an absent optional section is left out, not written as null."""
        return {k: v for k, v in _plain(dataclasses.asdict(self)).items() if v is not None}

    def dump(self, path: str | Path) -> None:
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# ------------------------------------------------------------------------------------------------- typed coercion
def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a ``--set`` string) to the field type ``hint``, or raise a clear ValueError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            num = float(value) if hint is float else int(str(value).replace("_", ""))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}") from None
        return num
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if origin in (tuple, list):
        if isinstance(value, str):
            parsed = yaml.safe_load(value)
            value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{where}: expected {len(args)} values, got {list(value)}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        item = args[0] if args else Any
        out = [_coerce(v, item, where) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"{where}: unsupported field type {hint}")  # pragma: no cover - a bug in this file


def _section(hint: Any) -> type | None:
    """The dataclass behind a section field: ``OptimCfg``, or ``DistillCfg`` for the optional ``DistillCfg | None``."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        section = _section(typing.get_type_hints(cls)[f.name])
        if section is not None:
            keys += _all_keys(section, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown(key: str, source: str) -> ValueError:
    candidates = _all_keys() if "." in key else [f.name for f in dataclasses.fields(Config)]  # a section: sections
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    sections = ", ".join(f.name for f in dataclasses.fields(Config))
    hint = f" — did you mean '{close[0]}'?" if close else f" (valid sections: {sections})"
    return ValueError(f"{source}: unknown config key '{key}'{hint}")


def _build(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(f"{prefix}{key}", source)
        hint = hints[key]
        section = _section(hint)
        if section is not None and value is None and section is not hint:
            kwargs[key] = None  # an optional section written as null: absent
        elif section is not None:
            kwargs[key] = _build(section, value or {}, source, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{source}: {prefix}{key}")
    return cls(**kwargs)


def _set(cfg: Config, assignment: str) -> None:
    """Apply one ``section.field=value`` (or ``section.dictfield.key=value``) override in place."""
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r}: expected key=value, e.g. --set optim.lr=1e-4")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise _unknown(key, "--set")
        names = {f.name for f in dataclasses.fields(obj)}
        if part not in names:
            raise _unknown(key, "--set")
        hint = typing.get_type_hints(type(obj))[part]
        rest = parts[i + 1:]
        if _section(hint) is not None:
            if not rest:
                raise ValueError(f"--set {key}: '{key}' is a section; set one of its fields, e.g. {key}.<field>=...")
            obj = getattr(obj, part)
            if obj is None:
                raise ValueError(f"--set {key}: the config has no '{part}:' section; add one to the YAML file")
            continue
        if rest:  # a key inside a dict field, e.g. model.overrides.head_channels=128
            if typing.get_origin(hint) is not dict:
                raise _unknown(key, "--set")
            target = getattr(obj, part)
            for depth, sub in enumerate(rest[:-1], start=i + 2):
                target = target.setdefault(sub, {})
                if not isinstance(target, dict):
                    raise ValueError(f"--set {key}: '{'.'.join(parts[:depth])}' is {target!r}, not a mapping; set it "
                                     f"whole, e.g. --set {'.'.join(parts[:depth])}=...")
            target[rest[-1]] = yaml.safe_load(raw)
        else:
            setattr(obj, part, _coerce(raw, hint, f"--set {key}"))
        return


def validate(cfg: Config, source: str = "config") -> Config:
    """Check the values that have a fixed vocabulary or must agree with each other."""
    from .data import DATASETS
    from .models import MODELS

    for key, name, known in (("model.name", cfg.model.name, MODELS), ("data.dataset", cfg.data.dataset, DATASETS)):
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else f"; one of {', '.join(known)}"
            raise ValueError(f"{source}: {key} '{name}' is unknown{hint}")
    if cfg.eval.mode not in ("whole", "slide"):
        raise ValueError(f"{source}: eval.mode must be 'whole' or 'slide', got '{cfg.eval.mode}'")
    if cfg.eval.mode == "slide" and (cfg.eval.crop_size is None or cfg.eval.stride is None):
        raise ValueError(f"{source}: eval.mode 'slide' needs eval.crop_size and eval.stride (the window and its "
                         f"step, e.g. --set eval.crop_size=[1024,1024] --set eval.stride=[768,768])")
    if cfg.train.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"{source}: train.amp must be none, bf16 or fp16, got '{cfg.train.amp}'")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{source}: train.device must be auto, cpu or cuda, got '{cfg.train.device}'")
    for name, val in (("data.batch_size", cfg.data.batch_size), ("train.grad_accum", cfg.train.grad_accum),
                      ("schedule.iters", cfg.schedule.iters), ("train.log_interval", cfg.train.log_interval)):
        if val < 1:
            raise ValueError(f"{source}: {name} must be >= 1, got {val}")
    if cfg.schedule.warmup_iters < 0 or not 0 < cfg.schedule.warmup_ratio <= 1:
        raise ValueError(f"{source}: schedule.warmup_iters must be >= 0 and warmup_ratio in (0, 1]")
    d, e = cfg.data, cfg.eval
    positive = [("data.crop_size", d.crop_size), ("data.scale", d.scale), ("data.test_scale", d.test_scale),
                ("data.ratio_range", d.ratio_range), ("eval.crop_size", e.crop_size or (1,)),
                ("eval.stride", e.stride or (1,)), ("eval.tta_ratios", e.tta_ratios or (1,)),
                ("data.size_divisor", (1 if d.size_divisor is None else d.size_divisor,)),
                ("model.num_classes", (1 if cfg.model.num_classes is None else cfg.model.num_classes,))]
    for name, values in positive:
        if not all(v > 0 for v in values):
            raise ValueError(f"{source}: {name} must be positive, got {list(values)}")
    if e.crop_size is not None and e.stride is not None and any(s > c for s, c in zip(e.stride, e.crop_size)):
        raise ValueError(f"{source}: eval.stride {list(e.stride)} must not exceed eval.crop_size {list(e.crop_size)}: "
                         f"windows would leave pixels unseen")
    for name, val in (("data.flip_prob", d.flip_prob), ("data.cat_max_ratio", d.cat_max_ratio)):
        if not 0 <= val <= 1:
            raise ValueError(f"{source}: {name} must be in [0, 1], got {val}")
    if cfg.schedule.power < 0:
        raise ValueError(f"{source}: schedule.power must be >= 0, got {cfg.schedule.power}")
    if d.ratio_range[0] > d.ratio_range[1]:
        raise ValueError(f"{source}: data.ratio_range is (low, high), got {list(d.ratio_range)}")
    if not all(s > 0 for s in d.std):
        raise ValueError(f"{source}: data.std divides the pixels: each must be positive, got {list(d.std)}")
    if e.tta and not e.tta_ratios:
        raise ValueError(f"{source}: eval.tta needs eval.tta_ratios, e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]")
    for name, val in (("optim.lr", cfg.optim.lr), ("optim.weight_decay", cfg.optim.weight_decay),
                      ("train.seed", cfg.train.seed), ("data.workers", d.workers),
                      ("train.eval_interval", cfg.train.eval_interval),
                      ("train.checkpoint_interval", cfg.train.checkpoint_interval),
                      ("train.max_keep_checkpoints", cfg.train.max_keep_checkpoints)):
        if val < 0:
            raise ValueError(f"{source}: {name} must be >= 0, got {val}")
    if cfg.distill is not None:
        kd = cfg.distill
        if not 0.0 <= kd.sparsity < 1.0:
            raise ValueError(f"{source}: distill.sparsity must be in [0, 1), got {kd.sparsity}")
        if kd.stage1_iters < 0 or kd.anneal_iters < 0:
            raise ValueError(f"{source}: distill.stage1_iters and distill.anneal_iters must be >= 0")
        if kd.temperature <= 0:
            raise ValueError(f"{source}: distill.temperature must be > 0, got {kd.temperature}")
        if kd.lambda_gate < 0 or kd.lambda_soft < 0:
            raise ValueError(f"{source}: distill.lambda_gate and lambda_soft weigh losses: they must be >= 0")
        total = kd.stage1_iters + cfg.schedule.iters
        if kd.anneal_iters > total:
            raise ValueError(f"{source}: distill.anneal_iters ({kd.anneal_iters}) exceeds the run's stage1_iters + "
                             f"schedule.iters ({total}): the student would never reach its sparsity")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply ``--set`` overrides.

    A config is one complete recipe, with no inheritance between files: what a run does is on one page.
    """
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if path.is_dir():
            raise ValueError(f"config '{path}' is a folder: pass a recipe YAML file, e.g. configs/demo_scenes.yaml")
        if not path.is_file():
            raise FileNotFoundError(f"config '{path}' does not exist: pass a YAML file, e.g. configs/demo_scenes.yaml")
        if path.suffix == ".py":  # an mmseg config: its _base_ inheritance and type= registries are not ours
            raise ValueError(f"config '{path}' is a Python (mmseg) config: edgeseg reads YAML recipes; start from the "
                             f"configs/*.yaml of the same model and dataset, whose values follow the official files")
        data = read_yaml(path, f"config '{path}'") or {}
        if not isinstance(data, dict):
            raise ValueError(f"config '{path}' must be a mapping of sections (model:, data:, ...)")
        if not data:  # every default is ADE20K's 160k-iteration TopFormer-Tiny: not what an empty file means
            raise ValueError(f"config '{path}' is empty: start from a configs/*.yaml recipe of the same model and "
                             f"dataset")
    cfg = _build(Config, data, source)
    for assignment in overrides:
        _set(cfg, assignment)
    return validate(cfg, f"{source} with --set" if overrides else source)
